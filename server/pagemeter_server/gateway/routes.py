"""The HTTP routes, read from the contract's `google.api.http` annotations.

Each RPC of pagemeter's services declares its routes once, in its .proto file
(a main binding and `additional_bindings`); nothing here names a path. A route
knows its HTTP method, its path template, the request fields bound by the path,
and where the rest of the request comes from: the JSON body (`body: "*"`) or the
query string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from google.api import annotations_pb2, http_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from pagemeter.v1 import (
    admin_pb2,
    billing_pb2,
    events_pb2,
    quota_pb2,
    reporting_pb2,
    webhooks_pb2,
)

# The services the HTTP/JSON API serves: every pagemeter service.
SERVICES: tuple[ServiceDescriptor, ...] = tuple(
    service
    for module in (quota_pb2, admin_pb2, reporting_pb2, billing_pb2, events_pb2, webhooks_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
)

# `{field}` or `{field.sub}` in a path template (no `=pattern` form: the contract
# uses none, and a route that did would be refused at start-up).
_VARIABLE = re.compile(r"\{([a-z_][a-z0-9_.]*)\}")
_VERBS = ("get", "put", "post", "delete", "patch")


@dataclass(frozen=True)
class Route:
    """One HTTP binding of one RPC."""

    verb: str  # upper case: GET, POST...
    template: str  # as declared: /v1/orgs/{org_id}/usage
    method: MethodDescriptor
    # The request fields the path binds, in order (dotted for nested fields).
    path_fields: tuple[str, ...]
    # "*" when the body is the request message, "" when there is none.
    body: str

    @property
    def service(self) -> str:
        return self.method.containing_service.full_name

    @property
    def full_method(self) -> str:
        """The gRPC method name: /pagemeter.v1.QuotaService/CheckQuota."""
        return f"/{self.service}/{self.method.name}"

    @property
    def router_path(self) -> str:
        """The template in aiohttp's router syntax (variable names without dots)."""
        return _VARIABLE.sub(lambda m: "{" + variable_name(m.group(1)) + "}", self.template)


def variable_name(field_path: str) -> str:
    """The router's name for a path variable: `plan.org_id` -> `plan__org_id`."""
    return field_path.replace(".", "__")


def _bindings(rule: http_pb2.HttpRule) -> list[http_pb2.HttpRule]:
    return [rule, *rule.additional_bindings]


def _route(method: MethodDescriptor, rule: http_pb2.HttpRule) -> Route:
    verb = rule.WhichOneof("pattern")
    if verb not in _VERBS:
        raise ValueError(f"{method.full_name}: unsupported HTTP binding {verb!r}")
    template: str = getattr(rule, verb)
    if "=" in template or "*" in template:
        raise ValueError(f"{method.full_name}: path template {template!r} is not supported")
    if rule.body not in ("", "*"):
        raise ValueError(f"{method.full_name}: body {rule.body!r} must be '*' or empty")
    return Route(
        verb=verb.upper(),
        template=template,
        method=method,
        path_fields=tuple(_VARIABLE.findall(template)),
        body=rule.body,
    )


def routes(services: tuple[ServiceDescriptor, ...] = SERVICES) -> list[Route]:
    """Every HTTP route of `services`, in contract order."""
    found = []
    for service in services:
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            for rule in _bindings(options.Extensions[annotations_pb2.http]):
                found.append(_route(method, rule))
    return found
