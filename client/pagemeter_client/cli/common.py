"""What the CLI's parts share: exit codes, variable names, bad input, ORG and units."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

from pagemeter_client.cli.arguments import count
from pagemeter_client.sdk import PagemeterClient, is_tenant_key

EXIT_OK = 0
EXIT_RPC_ERROR = 1
EXIT_USAGE = 2
EXIT_DENIED = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command its reader left

TARGET_ENV = "PAGEMETER_TARGET"
TOKEN_ENV = "PAGEMETER_TOKEN"  # noqa: S105 (the name of a variable, not a token)
TLS_ENV = "PAGEMETER_TLS"
TLS_CA_ENV = "PAGEMETER_TLS_CA"
# Not PAGEMETER_TLS_CERT/KEY: those name the server's own certificate and key
# (pagemeter-server reads them), and a shell may have both set.
TLS_CERT_ENV = "PAGEMETER_TLS_CLIENT_CERT"
TLS_KEY_ENV = "PAGEMETER_TLS_CLIENT_KEY"
TLS_SERVER_NAME_ENV = "PAGEMETER_TLS_SERVER_NAME"

Command = Callable[[PagemeterClient, argparse.Namespace], int]
# The outbox commands open the file themselves (and `flush` its client).
OutboxCommand = Callable[[argparse.Namespace], int]

Page = TypeVar("Page")
Page_co = TypeVar("Page_co", covariant=True)
Item = TypeVar("Item")
Item_co = TypeVar("Item_co", covariant=True)


class InputProblem(Exception):
    """Bad input found after parsing (e.g. in a --from-json file): exit 2, nothing sent."""


def units(args: argparse.Namespace) -> dict[str, int]:
    """The METRIC=UNITS arguments as a mapping; a metric given twice is refused."""
    given: dict[str, int] = {}
    for name, amount in args.units:
        if name in given:
            raise InputProblem(f"metric {name!r} is given twice")
        given[name] = amount
    return given


def read_org(args: argparse.Namespace) -> str:
    """The org_id of a read: ORG, or "" with a tenant API key (pagemeter takes it from the key)."""
    tenant = is_tenant_key(args.token)
    if not args.org:
        if not tenant:
            raise InputProblem(
                "ORG is required; it may be left out only with a tenant API key (pmk_...), "
                "whose organization pagemeter takes from the key"
            )
        return ""
    if tenant:
        raise InputProblem(
            "a tenant API key reads only its own organization, which pagemeter takes from "
            "the key: leave ORG out"
        )
    org: str = args.org
    return org


def add_paging(parser: argparse.ArgumentParser, items: str) -> None:
    """--page-size, and --page-token or --all, for a list read page by page."""
    parser.add_argument(
        "--page-size", type=count, default=0, help=f"{items} per page, 1-1000 (default 50)"
    )
    pages = parser.add_mutually_exclusive_group()
    pages.add_argument(
        "--page-token", default="", help="the next page token printed by the previous page"
    )
    pages.add_argument("--all", action="store_true", help="follow the pages to the last one")


class ListPage(Protocol[Page_co]):
    """A client's `list_...` method: one page of a paged list (of an organization, or
    of an endpoint)."""

    def __call__(self, owner: str, /, *, page_size: int, page_token: str) -> Page_co: ...


class IterPages(Protocol[Item_co]):
    """A client's `iter_...` method: every item of a paged list, page after page."""

    def __call__(self, owner: str, /, *, page_size: int) -> Iterable[Item_co]: ...


def page_or_all(
    args: argparse.Namespace,
    org_id: str,
    list_page: ListPage[Page],
    iter_pages: IterPages[Item],
    whole: Callable[[list[Item]], Page],
) -> Page:
    """The page --page-token names, or with --all every page as one answer.

    With --all and --json that answer is one response holding every item.
    """
    if args.all:
        return whole(list(iter_pages(org_id, page_size=args.page_size)))
    return list_page(org_id, page_size=args.page_size, page_token=args.page_token)
