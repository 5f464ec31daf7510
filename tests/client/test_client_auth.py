"""The SDK's credentials and TLS against real servers that enforce them.

Servers here have admin and service tokens and no open access (as in
tests/grpc/test_access.py); the TLS ones use certificates from a throwaway CA made
with `trustme`, written to files and passed to the server's Settings as an
operator would. The blocking client runs in a thread, since the servers live on
the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import grpc
import pytest
import redis.asyncio as aioredis
import trustme
from prometheus_client import CollectorRegistry

from pagemeter.v1 import admin_pb2, quota_pb2
from pagemeter_client import AsyncPagemeterClient, PagemeterClient, error_details
from pagemeter_server.api.auth import Credentials, Role
from pagemeter_server.app import create_server
from pagemeter_server.domain.clock import ManualClock
from pagemeter_server.settings import Settings
from tests.client.client_flavours import Connect
from tests.client.test_client_sdk import CuttingProxy
from tests.conftest import eagle_plan


class TlsOptions(TypedDict):
    """A client's TLS options, passed on as keyword arguments."""

    tls: bool
    root_certificates: bytes


ADMIN_TOKEN = "client-admin-token-0123456789abcdef"
SERVICE_TOKEN = "client-service-token-0123456789abcdef"
WRONG_TOKEN = "not-a-configured-token-0123456789"


def credentials() -> Credentials:
    creds = Credentials()
    creds.add(Role.ADMIN, "ops", ADMIN_TOKEN)
    creds.add(Role.SERVICE, "workers", SERVICE_TOKEN)
    return creds


@dataclass(frozen=True)
class Pki:
    """A throwaway CA, the server's certificate and key files, and client certificates."""

    ca: trustme.CA
    ca_pem: bytes
    ca_file: Path
    server_cert_file: Path
    server_key_file: Path
    client_cert_pem: bytes
    client_key_pem: bytes
    client_cert_file: Path
    client_key_file: Path


def make_pki(directory: Path, *server_names: str) -> Pki:
    """A CA in `directory` with a server certificate for `server_names` and a client one."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert(*(server_names or ("localhost", "127.0.0.1")))
    client = ca.issue_cert("worker.pagemeter.test")
    paths = {
        name: directory / name
        for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
    }
    ca.cert_pem.write_to_path(str(paths["ca.pem"]))
    paths["server.pem"].write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(str(paths["server.key"]))
    client.cert_chain_pems[0].write_to_path(str(paths["client.pem"]))
    client.private_key_pem.write_to_path(str(paths["client.key"]))
    return Pki(
        ca=ca,
        ca_pem=ca.cert_pem.bytes(),
        ca_file=paths["ca.pem"],
        server_cert_file=paths["server.pem"],
        server_key_file=paths["server.key"],
        client_cert_pem=client.cert_chain_pems[0].bytes(),
        client_key_pem=client.private_key_pem.bytes(),
        client_cert_file=paths["client.pem"],
        client_key_file=paths["client.key"],
    )


@contextlib.asynccontextmanager
async def secured_server(
    redis_url: str,
    redis_client: aioredis.Redis,
    clock: ManualClock,
    *,
    pki: Pki | None = None,
    mutual: bool = False,
    read_rate_limit: float = 1000,
    read_burst: int = 1000,
) -> AsyncIterator[str]:
    """A server with admin and service tokens (no open access), TLS with `pki`; yields its target."""
    settings = Settings(
        redis_url=redis_url,
        listen="127.0.0.1:0",
        metrics_listen="",
        read_rate_limit=read_rate_limit,
        read_burst=read_burst,
        tls_cert_file=str(pki.server_cert_file) if pki else "",
        tls_key_file=str(pki.server_key_file) if pki else "",
        tls_client_ca_file=str(pki.ca_file) if pki and mutual else "",
    )
    server, port, _ = await create_server(
        settings, redis_client, clock=clock, registry=CollectorRegistry(), credentials=credentials()
    )
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
async def plain_target(
    settings: Settings, redis_client: aioredis.Redis, clock: ManualClock
) -> AsyncIterator[str]:
    """A plaintext server that enforces tokens."""
    async with secured_server(settings.redis_url, redis_client, clock) as target:
        yield target


@pytest.fixture
async def tls_target(
    settings: Settings, redis_client: aioredis.Redis, clock: ManualClock, pki: Pki
) -> AsyncIterator[str]:
    """A TLS server (certificate for localhost and 127.0.0.1) that enforces tokens."""
    async with secured_server(settings.redis_url, redis_client, clock, pki=pki) as target:
        yield target


@pytest.fixture
async def mtls_target(
    settings: Settings, redis_client: aioredis.Redis, clock: ManualClock, pki: Pki
) -> AsyncIterator[str]:
    """A mutual-TLS server: callers need a certificate from the CA, and a token."""
    async with secured_server(
        settings.redis_url, redis_client, clock, pki=pki, mutual=True
    ) as target:
        yield target


async def failure(call: Any) -> Any:
    """The error a call fails with: a grpc.RpcError that is also a grpc.Call (.code())."""
    with pytest.raises(grpc.RpcError) as caught:
        await call
    return caught.value


def error_text(error: grpc.RpcError) -> str:
    """Everything an error shows: str, repr, details and the decoded lines."""
    return "\n".join([str(error), repr(error), *error_details(error).lines()])


# -- TLS and mutual TLS -----------------------------------------------------------------------


async def test_tls_with_the_ca_connects_and_carries_the_token(
    connect: Connect, tls_target: str, pki: Pki
) -> None:
    """With tls=True and the server's CA, both clients connect over TLS and their token is accepted."""
    async with connect(
        tls_target, token=ADMIN_TOKEN, tls=True, root_certificates=pki.ca_pem
    ) as client:
        stored = await client.set_plan(eagle_plan())
        assert stored.plan.version == 1
        usage = await client.get_usage("acme")
        assert usage.org_id == "acme" and usage.has_plan

    def blocking() -> quota_pb2.GetUsageResponse:
        with PagemeterClient(
            tls_target.replace("127.0.0.1", "localhost"),
            token=SERVICE_TOKEN,
            tls=True,
            root_certificates=pki.ca_pem,
        ) as client:
            return client.get_usage("acme")

    assert (await asyncio.to_thread(blocking)).org_id == "acme"


async def test_plaintext_client_cannot_talk_to_a_tls_server(
    connect: Connect, tls_target: str
) -> None:
    """A client without TLS gets no answer from a TLS server: the call fails UNAVAILABLE."""
    async with connect(tls_target, token=ADMIN_TOKEN, max_attempts=1, timeout=3) as client:
        error = await failure(client.get_usage("acme"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_tls_client_refuses_a_server_it_cannot_verify(
    connect: Connect, tls_target: str, tmp_path: Path
) -> None:
    """With the system's roots or another CA, the server's certificate is not trusted and nothing is sent."""
    stranger = make_pki(tmp_path / "stranger")
    for roots in (None, stranger.ca_pem):
        async with connect(
            tls_target,
            token=ADMIN_TOKEN,
            tls=True,
            root_certificates=roots,
            max_attempts=1,
            timeout=3,
        ) as client:
            error = await failure(client.get_usage("acme"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_plaintext_server_refuses_a_tls_client(
    connect: Connect, plain_target: str, pki: Pki
) -> None:
    """A TLS client cannot talk to a plaintext server: UNAVAILABLE, nothing downgraded."""
    async with connect(
        plain_target,
        token=ADMIN_TOKEN,
        tls=True,
        root_certificates=pki.ca_pem,
        max_attempts=1,
        timeout=3,
    ) as client:
        error = await failure(client.get_usage("acme"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_tls_server_name_overrides_the_name_checked(
    connect: Connect,
    settings: Settings,
    redis_client: aioredis.Redis,
    clock: ManualClock,
    tmp_path: Path,
) -> None:
    """A certificate issued only to pagemeter.test is accepted at 127.0.0.1 with tls_server_name, refused without."""
    named = make_pki(tmp_path / "named", "pagemeter.test")
    async with secured_server(settings.redis_url, redis_client, clock, pki=named) as target:
        async with connect(
            target,
            token=ADMIN_TOKEN,
            tls=True,
            root_certificates=named.ca_pem,
            tls_server_name="pagemeter.test",
        ) as client:
            assert (await client.get_usage("acme")).org_id == "acme"
        async with connect(
            target,
            token=ADMIN_TOKEN,
            tls=True,
            root_certificates=named.ca_pem,
            max_attempts=1,
            timeout=3,
        ) as client:
            error = await failure(client.get_usage("acme"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_needs_a_client_certificate_from_the_ca(
    connect: Connect, mtls_target: str, pki: Pki, tmp_path: Path
) -> None:
    """With mutual TLS a client without a certificate, or with one from another CA, fails; one from the CA succeeds."""
    stranger = make_pki(tmp_path / "stranger")
    for cert, key in ((None, None), (stranger.client_cert_pem, stranger.client_key_pem)):
        async with connect(
            mtls_target,
            token=ADMIN_TOKEN,
            tls=True,
            root_certificates=pki.ca_pem,
            client_certificate=cert,
            client_key=key,
            max_attempts=1,
            timeout=3,
        ) as client:
            error = await failure(client.get_usage("acme"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
    async with connect(
        mtls_target,
        token=ADMIN_TOKEN,
        tls=True,
        root_certificates=pki.ca_pem,
        client_certificate=pki.client_cert_pem,
        client_key=pki.client_key_pem,
    ) as client:
        assert (await client.get_usage("acme")).org_id == "acme"


async def test_mutual_tls_still_needs_the_token(
    connect: Connect, mtls_target: str, pki: Pki
) -> None:
    """A client certificate from the CA is not a credential: without a token the call is UNAUTHENTICATED."""
    async with connect(
        mtls_target,
        tls=True,
        root_certificates=pki.ca_pem,
        client_certificate=pki.client_cert_pem,
        client_key=pki.client_key_pem,
    ) as client:
        error = await failure(client.get_usage("acme"))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


# -- tokens ---------------------------------------------------------------------------------------


async def test_wrong_or_missing_token_is_unauthenticated_and_never_echoed(
    connect: Connect, tls_target: str, pki: Pki
) -> None:
    """A wrong token fails UNAUTHENTICATED (INVALID_API_KEY), no token UNAUTHENTICATED (UNAUTHORIZED), and the error never shows the token."""
    async with connect(
        tls_target, token=WRONG_TOKEN, tls=True, root_certificates=pki.ca_pem
    ) as client:
        error = await failure(client.get_usage("acme"))
        assert WRONG_TOKEN not in repr(client)
    details = error_details(error)
    assert details.code == grpc.StatusCode.UNAUTHENTICATED
    assert [info.reason for info in details.error_infos] == ["INVALID_API_KEY"]
    assert WRONG_TOKEN not in error_text(error)

    async with connect(tls_target, tls=True, root_certificates=pki.ca_pem) as client:
        missing = await failure(client.get_usage("acme"))
    assert [i.reason for i in error_details(missing).error_infos] == ["UNAUTHORIZED"]

    def blocking() -> grpc.RpcError:
        with (
            PagemeterClient(
                tls_target, token=WRONG_TOKEN, tls=True, root_certificates=pki.ca_pem
            ) as client,
            pytest.raises(grpc.RpcError) as caught,
        ):
            client.get_usage("acme")
        return caught.value

    sync_error = await asyncio.to_thread(blocking)
    assert error_details(sync_error).code == grpc.StatusCode.UNAUTHENTICATED
    assert WRONG_TOKEN not in error_text(sync_error)


async def test_service_token_may_record_but_not_administer(
    connect: Connect, plain_target: str
) -> None:
    """A service token records usage; an admin call with it is PERMISSION_DENIED."""
    async with connect(plain_target, token=ADMIN_TOKEN) as admin:
        await admin.set_plan(eagle_plan())
    async with connect(plain_target, token=SERVICE_TOKEN) as worker:
        recorded = await worker.record_usage("acme", "job-1", {"pages": 3})
        assert {m.metric: m.committed for m in recorded.metrics}["pages"] == 3
        error = await failure(worker.set_plan(eagle_plan()))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


def test_token_is_hidden_from_repr() -> None:
    """repr() of either client says a token is set and whether TLS is on, never the token itself."""
    sync_client = PagemeterClient("127.0.0.1:1", token=ADMIN_TOKEN, tls=True)
    try:
        assert (
            repr(sync_client) == "PagemeterClient(target='127.0.0.1:1', tls=True, token=<hidden>)"
        )
    finally:
        sync_client.close()
    async_client = AsyncPagemeterClient("127.0.0.1:1", token=ADMIN_TOKEN)
    assert ADMIN_TOKEN not in repr(async_client)
    assert "tls=False" in repr(async_client) and "token=<hidden>" in repr(async_client)
    assert "token=None" in repr(AsyncPagemeterClient("127.0.0.1:1"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tls": True, "client_certificate": b"cert"}, "client_certificate and client_key"),
        ({"tls": True, "client_key": b"key"}, "client_certificate and client_key"),
        ({"root_certificates": b"ca"}, "root_certificates need tls=True"),
        (
            {"client_certificate": b"c", "client_key": b"k"},
            "client_certificate, client_key need tls=True",
        ),
        ({"tls_server_name": "localhost"}, "tls_server_name needs TLS"),
        (
            {"tls": True, "credentials": grpc.ssl_channel_credentials()},
            "either credentials= or tls=True",
        ),
        ({"token": ""}, "token must be a non-empty string"),
        ({"token": f"{ADMIN_TOKEN} x"}, "token must be a non-empty string"),
        ({"token": f"{ADMIN_TOKEN}\n"}, "token must be a non-empty string"),
        (
            {"token": ADMIN_TOKEN, "metadata": [("x-api-key", SERVICE_TOKEN)]},
            "either as token= or as authorization/x-api-key metadata",
        ),
    ],
)
def test_bad_options_are_refused_before_connecting(options: dict[str, Any], message: str) -> None:
    """Inconsistent TLS options, a malformed token or two credentials raise ValueError, and the message never holds a token."""
    for client_class in (AsyncPagemeterClient, PagemeterClient):
        with pytest.raises(ValueError, match=message) as caught:
            client_class("127.0.0.1:1", **options)
        assert ADMIN_TOKEN not in str(caught.value)
        assert SERVICE_TOKEN not in str(caught.value)


# -- tenant keys --------------------------------------------------------------------------------


async def test_tenant_key_reads_its_own_org_with_an_empty_org_id(
    connect: Connect, tls_target: str, pki: Pki
) -> None:
    """A tenant key reads usage, history, statistics and records of its own org with org_id "" (the default); naming an org or writing is PERMISSION_DENIED."""
    tls = TlsOptions(tls=True, root_certificates=pki.ca_pem)
    async with connect(tls_target, token=ADMIN_TOKEN, **tls) as admin:
        await admin.set_plan(eagle_plan())
        await admin.set_plan(eagle_plan(org_id="globex"))
        key = await admin.create_api_key("acme", "billing page")
    async with connect(tls_target, token=SERVICE_TOKEN, **tls) as worker:
        for i in range(3):
            await worker.record_usage("acme", f"job-{i}", {"pages": 5}, document_type="invoice")
        await worker.record_usage("globex", "job-x", {"pages": 50})
    assert key.secret.startswith("pmk_")

    async with connect(tls_target, token=key.secret, **tls) as tenant:
        usage = await tenant.get_usage()
        assert usage.org_id == "acme"
        assert {m.metric: m.committed for m in usage.metrics}["pages"] == 15
        assert (await tenant.get_usage("", year=2026, month=3)).org_id == "acme"
        history = await tenant.get_usage_history(months=2)
        assert history.org_id == "acme" and len(history.months) == 2
        stats = await tenant.get_usage_statistics(group_by="document_type")
        assert stats.org_id == "acme" and stats.summary.totals.pages == 15
        page = await tenant.list_usage_records(page_size=2)
        assert len(page.records) == 2 and page.next_page_token
        assert [r.request_id async for r in tenant.iter_usage_records(page_size=2)] == [
            "job-2",
            "job-1",
            "job-0",
        ]
        named = await failure(tenant.get_usage("acme"))
        assert named.code() == grpc.StatusCode.PERMISSION_DENIED
        assert [i.reason for i in error_details(named).error_infos] == ["ORG_FROM_API_KEY"]
        other = await failure(tenant.get_usage_history("globex"))
        assert other.code() == grpc.StatusCode.PERMISSION_DENIED
        write = await failure(tenant.check_quota("", {"pages": 1}))
        assert write.code() == grpc.StatusCode.PERMISSION_DENIED

    def blocking() -> quota_pb2.GetUsageResponse:
        with PagemeterClient(tls_target, token=key.secret, **tls) as tenant:
            return tenant.get_usage()

    assert (await asyncio.to_thread(blocking)).org_id == "acme"


async def test_read_flood_is_resource_exhausted_with_retry_after(
    connect: Connect, settings: Settings, redis_client: aioredis.Redis, clock: ManualClock
) -> None:
    """A tenant key over its read limit fails RESOURCE_EXHAUSTED, and error_details gives the RetryInfo delay."""
    async with secured_server(
        settings.redis_url, redis_client, clock, read_rate_limit=1, read_burst=1
    ) as target:
        async with connect(target, token=ADMIN_TOKEN) as admin:
            key = await admin.create_api_key("acme")
        async with connect(target, token=key.secret) as tenant:
            await tenant.get_usage()
            error = await failure(tenant.get_usage())
    details = error_details(error)
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.retry_after is not None and 0 < details.retry_after.total_seconds() <= 1
    assert details.lines()[-1].startswith("  retry after: ")


# -- the new admin methods ------------------------------------------------------------------------


async def test_api_keys_are_created_listed_and_revoked(connect: Connect, plain_target: str) -> None:
    """create_api_key returns the secret once, list_api_keys shows ids only, revoke_api_key stops the key at its next call."""
    async with connect(plain_target, token=ADMIN_TOKEN) as admin:
        await admin.set_plan(eagle_plan())
        first = await admin.create_api_key("acme", "billing page")
        second = await admin.create_api_key("acme")
        assert first.key.org_id == "acme" and first.key.name == "billing page"
        listing = await admin.list_api_keys("acme")
        assert {k.key_id for k in listing.keys} == {first.key.key_id, second.key.key_id}
        assert first.secret.encode() not in listing.SerializeToString()
        async with connect(plain_target, token=first.secret) as tenant:
            await tenant.get_usage()
            revoked = await admin.revoke_api_key("acme", first.key.key_id)
            assert revoked.key.revoked and not revoked.already_revoked
            error = await failure(tenant.get_usage())
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        again = await admin.revoke_api_key("acme", first.key.key_id)
        assert again.already_revoked

    def blocking() -> admin_pb2.ListApiKeysResponse:
        with PagemeterClient(plain_target, token=ADMIN_TOKEN) as client:
            client.revoke_api_key("acme", second.key.key_id)
            return client.list_api_keys("acme")

    assert all(k.revoked for k in (await asyncio.to_thread(blocking)).keys)


async def test_usage_adjustments_and_the_audit_trail(connect: Connect, plain_target: str) -> None:
    """adjust_usage corrects a month once per id; list_audit_events pages and iter_audit_events walks the whole trail, newest first."""
    async with connect(plain_target, token=ADMIN_TOKEN) as admin:
        await admin.set_plan(eagle_plan())
        added = await admin.adjust_usage(
            "acme", "pages", 12, reason="missed job", adjustment_id="adj-1", year=2026, month=3
        )
        assert (added.period_id, added.committed_before, added.committed_after) == (
            "2026-03",
            0,
            12,
        )
        again = await admin.adjust_usage(
            "acme", "pages", 12, reason="missed job", adjustment_id="adj-1", year=2026, month=3
        )
        assert again.duplicate and again.committed_after == 12
        removed = await admin.adjust_usage(
            "acme", "pages", -5, reason="ticket 7", adjustment_id="adj-2"
        )
        assert removed.committed_after == 7
        await admin.grant_credits("acme", "pages", 10, "grant-1")
        page = await admin.list_audit_events("acme", page_size=2)
        assert [e.action for e in page.events] == ["credits.grant", "usage.adjust"]
        assert page.next_page_token
        rest = await admin.list_audit_events("acme", 2, page.next_page_token)
        assert [e.action for e in rest.events] == ["usage.adjust", "plan.set"]
        events = [e async for e in admin.iter_audit_events("acme", page_size=1)]
    assert [e.action for e in events] == [
        "credits.grant",
        "usage.adjust",
        "usage.adjust",
        "plan.set",
    ]
    assert {e.actor for e in events} == {"admin:ops"}
    assert events[1].reason == "ticket 7"

    def blocking() -> list[admin_pb2.AuditEvent]:
        with PagemeterClient(plain_target, token=ADMIN_TOKEN) as client:
            return list(client.iter_audit_events("acme", page_size=3))

    assert [e.event_id for e in await asyncio.to_thread(blocking)] == [e.event_id for e in events]


# -- retries over TLS ---------------------------------------------------------------------------


class TlsCuttingProxy(CuttingProxy):
    """The cutting proxy of tests/client/test_client_sdk.py, taking TLS from the client.

    It terminates TLS with its own certificate (ALPN h2, as gRPC needs) and
    forwards plaintext HTTP/2 to the server, so it can still see and cut answers.
    """

    def __init__(self, upstream_port: int, context: ssl.SSLContext) -> None:
        super().__init__(upstream_port)
        self.context = context

    async def __aenter__(self) -> TlsCuttingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # A TLS close waits for the peer's close_notify: drop every connection at once.
        for writer in self._writers:
            writer.transport.abort()
        await super().__aexit__(*exc_info)

    async def _pump_answers(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        upstream: asyncio.StreamWriter,
    ) -> None:
        await super()._pump_answers(source, sink, upstream)
        sink.transport.abort()


def proxy_context() -> tuple[ssl.SSLContext, bytes]:
    """A server-side TLS context for 127.0.0.1 and the CA that signed it."""
    ca = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    context.set_alpn_protocols(["h2"])
    return context, ca.cert_pem.bytes()


async def test_retries_still_apply_over_tls_with_a_token(
    connect: Connect, plain_target: str
) -> None:
    """Over TLS with a token, a RecordUsage whose answer is lost is retried with the same request and token, and counted once."""
    context, ca_pem = proxy_context()
    port = int(plain_target.rsplit(":", 1)[1])
    async with (
        TlsCuttingProxy(port, context) as proxy,
        connect(
            proxy.target,
            token=SERVICE_TOKEN,
            tls=True,
            root_certificates=ca_pem,
            initial_backoff=0.05,
        ) as worker,
        connect(plain_target, token=ADMIN_TOKEN) as admin,
    ):
        await admin.set_plan(eagle_plan())
        proxy.lose_next_answer()
        recorded = await worker.record_usage("acme", "job-1", {"pages": 7})
        assert proxy.cuts == 1 and proxy.connections >= 2
        assert recorded.duplicate  # the first attempt was recorded; the retry says so
        usage = await admin.get_usage("acme")
    assert {m.metric: m.committed for m in usage.metrics}["pages"] == 7


async def test_create_api_key_is_not_retried(connect: Connect, plain_target: str) -> None:
    """A CreateApiKey whose answer is lost fails UNAVAILABLE instead of being retried into a second key."""
    context, ca_pem = proxy_context()
    port = int(plain_target.rsplit(":", 1)[1])
    async with (
        TlsCuttingProxy(port, context) as proxy,
        connect(
            proxy.target,
            token=ADMIN_TOKEN,
            tls=True,
            root_certificates=ca_pem,
            initial_backoff=0.05,
        ) as admin,
    ):
        await admin.set_plan(eagle_plan())
        proxy.lose_next_answer()
        error = await failure(admin.create_api_key("acme", "lost"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        listing = await admin.list_api_keys("acme")
    assert [k.name for k in listing.keys] == ["lost"]
