"""Who may call what: credentials, roles and the per-RPC authorization rule.

Three roles (docs/security.md):
- admin: every RPC; configured tokens.
- service: CheckQuota, RecordUsage, ReleaseQuota and the reads, for any
  organization; configured tokens.
- tenant: the reads only, for the organization of its API key, which pagemeter
  takes from the key: a tenant request that names an organization is refused.

Credentials travel as gRPC metadata, `authorization: Bearer <token>` or
`x-api-key: <token>`. Configured tokens are compared in constant time (as
SHA-256 digests, so their length does not leak either); tenant keys are looked
up by their id and checked against the stored digest in one script call that
also applies the per-key read flood limit.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import enum
import functools
import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc

from pagemeter_server.api.status import Handler, Request, Response, grpc_errors
from pagemeter_server.domain.clock import Clock
from pagemeter_server.domain.errors import (
    ConfigurationError,
    PermissionDenied,
    ReadRateLimited,
    Unauthenticated,
)
from pagemeter_server.domain.validation import KEY_ID, ORG_ID
from pagemeter_server.settings import Settings, split_host_port

API_KEY_PREFIX = "pmk_"
MIN_TOKEN_LENGTH = 16
ADMIN_TOKENS_ENV = "PAGEMETER_ADMIN_TOKENS"
SERVICE_TOKENS_ENV = "PAGEMETER_SERVICE_TOKENS"


class Role(enum.Enum):
    ADMIN = "admin"
    SERVICE = "service"
    TENANT = "tenant"


class Access(enum.Enum):
    """What an RPC needs: the roles allowed to call it."""

    ADMIN = frozenset({Role.ADMIN})
    WRITE = frozenset({Role.ADMIN, Role.SERVICE})
    READ = frozenset({Role.ADMIN, Role.SERVICE, Role.TENANT})


@dataclass(frozen=True)
class Principal:
    role: Role
    # For the audit trail: "admin:<name>", "service:<name>", "tenant:<key id>",
    # or "open-access".
    actor: str
    # The tenant's organization (empty for admin and service).
    org_id: str = ""


OPEN_ACCESS = Principal(Role.ADMIN, "open-access")
_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")


def current_principal() -> Principal:
    """The caller of the RPC being handled (set by `authorized`)."""
    return _current.get(OPEN_ACCESS)


# -- configured credentials -------------------------------------------------------------


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass
class Credentials:
    """The admin and service tokens, kept only as SHA-256 digests with a name."""

    tokens: list[tuple[bytes, Principal]] = field(default_factory=list)

    def add(self, role: Role, name: str, token: str) -> None:
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigurationError(
                f"the {role.value} token named {name!r} is shorter than {MIN_TOKEN_LENGTH} "
                "characters; use a long random token (e.g. `openssl rand -hex 32`)"
            )
        if token.startswith(API_KEY_PREFIX):
            raise ConfigurationError(f"{role.value} tokens must not start with {API_KEY_PREFIX!r}")
        digest = _digest(token)
        if any(hmac.compare_digest(digest, known) for known, _ in self.tokens):
            raise ConfigurationError(f"the {role.value} token named {name!r} is configured twice")
        self.tokens.append((digest, Principal(role, f"{role.value}:{name}")))

    def match(self, token: str) -> Principal | None:
        """The principal of a configured token; every candidate is compared."""
        digest = _digest(token)
        found = None
        for known, principal in self.tokens:
            if hmac.compare_digest(digest, known):
                found = principal
        return found

    def __bool__(self) -> bool:
        return bool(self.tokens)


def _entries(text: str, role: Role) -> list[tuple[str, str]]:
    """'name=token' entries, separated by commas or new lines; '#' starts a comment."""
    entries = []
    for raw in text.replace(",", "\n").splitlines():
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        name, sep, token = entry.partition("=")
        if not sep:
            name, token = f"{role.value}-{hashlib.sha256(entry.encode()).hexdigest()[:8]}", entry
        entries.append((name.strip(), token.strip()))
    return entries


def load_credentials(settings: Settings, environ: Mapping[str, str]) -> Credentials:
    """Admin and service tokens from their environment variables and files."""
    credentials = Credentials()
    sources = (
        (Role.ADMIN, environ.get(ADMIN_TOKENS_ENV, ""), settings.admin_tokens_file),
        (Role.SERVICE, environ.get(SERVICE_TOKENS_ENV, ""), settings.service_tokens_file),
    )
    for role, from_env, path in sources:
        text = from_env
        if path:
            try:
                text += "\n" + Path(path).read_text()
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot read the {role.value} tokens file {path}: {exc.strerror}"
                ) from exc
        for name, token in _entries(text, role):
            credentials.add(role, name, token)
    return credentials


def check_open_access(settings: Settings, credentials: Credentials, listen: str) -> None:
    """Refuse to serve without credentials, unless explicitly open on loopback."""
    if settings.dev_open_access:
        host, _ = split_host_port(listen)
        if not _is_loopback(host):
            raise ConfigurationError(
                f"--dev-open-access serves every caller as an admin; it is allowed only on a "
                f"loopback address, not on {listen}"
            )
        return
    if not credentials:
        raise ConfigurationError(
            f"no credentials are configured: set {ADMIN_TOKENS_ENV} and {SERVICE_TOKENS_ENV} "
            "(or --admin-tokens-file / --service-tokens-file), or pass --dev-open-access "
            "for local development on 127.0.0.1"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- tenant API keys ----------------------------------------------------------------------


@dataclass(frozen=True)
class NewApiKey:
    key_id: str
    secret: str
    digest: str


def new_api_key(org_id: str) -> NewApiKey:
    """A fresh key: pmk_<org, base64url>.<key id>.<256 random bits>."""
    key_id = secrets.token_hex(8)
    org = base64.urlsafe_b64encode(org_id.encode()).decode().rstrip("=")
    secret = f"{API_KEY_PREFIX}{org}.{key_id}.{secrets.token_urlsafe(32)}"
    return NewApiKey(key_id, secret, key_digest(secret))


def key_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_api_key(secret: str) -> tuple[str, str] | None:
    """(org_id, key_id) of a well-formed key, else None. Proves nothing by itself."""
    parts = secret.removeprefix(API_KEY_PREFIX).split(".")
    if not secret.startswith(API_KEY_PREFIX) or len(parts) != 3 or len(secret) > 256:
        return None
    org_b64, key_id, _ = parts
    try:
        org_id = base64.urlsafe_b64decode(org_b64 + "=" * (-len(org_b64) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    if not ORG_ID.fullmatch(org_id) or not KEY_ID.fullmatch(key_id):
        return None
    return org_id, key_id


class KeyChecker(Protocol):
    async def check_key(
        self, org_id: str, key_id: str, digest: str, *, now_ms: int, rate: float, burst: int
    ) -> tuple[str, int]: ...


# -- the per-call rule ----------------------------------------------------------------------


def presented_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The credential of a call: `authorization: Bearer <t>` or `x-api-key: <t>`."""
    found: set[str] = set()
    for name, value in metadata or ():
        text = value.decode() if isinstance(value, bytes) else str(value)
        if name == "authorization":
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated(
                    "the authorization header must be 'Bearer <token>'", "UNAUTHORIZED"
                )
            found.add(token.strip())
        elif name == "x-api-key":
            found.add(text.strip())
    if len(found) > 1:
        raise Unauthenticated("send one credential, not several", "UNAUTHORIZED")
    return found.pop() if found else None


class Authenticator:
    def __init__(
        self,
        credentials: Credentials,
        keys: KeyChecker,
        clock: Clock,
        *,
        open_access: bool,
        read_rate: float,
        read_burst: int,
    ) -> None:
        self.credentials = credentials
        self.keys = keys
        self.clock = clock
        self.open_access = open_access
        self.read_rate = read_rate
        self.read_burst = read_burst

    async def authenticate(
        self, metadata: Sequence[tuple[str, Any]] | None, *, counts_as_read: bool = True
    ) -> Principal:
        """Who is calling. A tenant key spends a read of its flood limit only when
        `counts_as_read` (the RPC is one a tenant may call): a key sent to a write
        or admin RPC is refused for its role, not for its read rate."""
        token = presented_token(metadata)
        if token is None:
            if self.open_access:
                return OPEN_ACCESS
            raise Unauthenticated(
                "missing credentials: send 'authorization: Bearer <token>' or 'x-api-key'",
                "UNAUTHORIZED",
            )
        if token.startswith(API_KEY_PREFIX):
            return await self._tenant(token, counts_as_read)
        principal = self.credentials.match(token)
        if principal is None:
            raise Unauthenticated("the credential is not valid", "INVALID_API_KEY")
        return principal

    async def _tenant(self, token: str, counts_as_read: bool) -> Principal:
        parsed = parse_api_key(token)
        if parsed is None:
            raise Unauthenticated("the API key is malformed", "INVALID_API_KEY")
        org_id, key_id = parsed
        outcome, retry_after_ms = await self.keys.check_key(
            org_id,
            key_id,
            key_digest(token),
            now_ms=self.clock.now_ms(),
            # Rate 0 checks the key without spending (or needing) a read.
            rate=self.read_rate if counts_as_read else 0.0,
            burst=self.read_burst,
        )
        if outcome == "rate_limited":
            raise ReadRateLimited(retry_after_ms)
        if outcome != "ok":
            # Unknown and revoked keys get the same answer: a caller cannot tell
            # whether a key it tries ever existed.
            raise Unauthenticated(
                "the API key is not valid (unknown or revoked)", "INVALID_API_KEY"
            )
        return Principal(Role.TENANT, f"tenant:{key_id}", org_id)


def authorized(
    access: Access,
) -> Callable[[Handler[Request, Response]], Handler[Request, Response]]:
    """Decorate an RPC handler: authenticate, apply the role rule, bind a tenant's org.

    Also maps every failure to a deliberate status (it includes `grpc_errors`).
    """

    # Read once: an enum member's .value is a property lookup, and this is every call.
    roles = access.value
    counts_as_read = Role.TENANT in roles

    def decorate(handler: Handler[Request, Response]) -> Handler[Request, Response]:
        @grpc_errors
        @functools.wraps(handler)
        async def wrapped(
            self: Any, request: Request, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Response:
            principal = await self.auth.authenticate(
                context.invocation_metadata(), counts_as_read=counts_as_read
            )
            if principal.role not in roles:
                raise PermissionDenied(
                    f"{principal.role.value} credentials may not call {handler.__name__}",
                    "PERMISSION_DENIED",
                )
            if principal.role is Role.TENANT:
                if getattr(request, "org_id", ""):
                    raise PermissionDenied(
                        "an API key reads only its own organization, which pagemeter takes "
                        "from the key: leave org_id empty",
                        "ORG_FROM_API_KEY",
                    )
                request.org_id = principal.org_id  # type: ignore[attr-defined]
            token = _current.set(principal)
            try:
                return await handler(self, request, context)
            finally:
                _current.reset(token)

        return wrapped

    return decorate
