"""JSON and query strings to request messages, answers and statuses to JSON.

The request of an HTTP call is built the way Google's HTTP transcoding builds
it (grpc-gateway and Envoy's transcoder behave alike): the path binds the
fields its template names; with `body: "*"` the JSON body is the rest of the
message; without a body, each query parameter sets the field it names (by its
proto name or its JSON name, dotted for nested fields, repeated by repeating
the parameter). JSON is protobuf's canonical mapping both ways.

What cannot be turned into a request is refused as INVALID_ARGUMENT before any
handler runs, with a message that names the parameter and what it accepts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from pagemeter_server.api.status import DOMAIN
from pagemeter_server.domain.validation import MONTH_INVALID, YEAR_INVALID

# What a query value that does not parse is answered with, when a seed page
# fixed the wording for that parameter (DocuTray's year and month).
SEED_TEXTS = {"year": YEAR_INVALID, "month": MONTH_INVALID}
# DocuRift's code for "Invalid query parameter value".
INVALID_PARAMETER = "INVALID_PARAMETER"

# Descriptors as the upb runtime types them (its classes, not descriptor.py's).
Descriptor = Any
EnumDescriptor = Any

# Well-known messages a single query or path value can set (their JSON form is a string).
_SCALAR_MESSAGES = {
    "google.protobuf.Timestamp": "an RFC 3339 time such as 2026-01-31T09:30:00Z",
    "google.protobuf.Duration": "a duration in seconds such as 3600s",
    "google.protobuf.FieldMask": "field names separated by commas",
}

_INTEGERS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


class Refused(Exception):
    """A call the gateway answers itself: a google.rpc.Status, before any handler."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


def refusal(
    code: int, message: str, *, field: str = "", reason: str = "", description: str = ""
) -> Refused:
    """A Refused with a BadRequest naming `field` and an ErrorInfo carrying `reason`."""
    status = status_pb2.Status(code=code, message=message)
    if field or description:
        status.details.add().Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=field, description=description or message
                    )
                ]
            )
        )
    if reason:
        status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
    return Refused(status)


def _bad_parameter(name: str, message: str) -> Refused:
    return refusal(code_pb2.INVALID_ARGUMENT, message, field=name, reason=INVALID_PARAMETER)


# -- fields from text --------------------------------------------------------------------


def _field(descriptor: Descriptor, name: str) -> Any:
    """A field by its proto name or its JSON (lowerCamelCase) name."""
    found = descriptor.fields_by_name.get(name)
    if found is not None:
        return found
    for field in descriptor.fields:
        if field.json_name == name:
            return field
    return None


def _enum_value(enum: EnumDescriptor, text: str) -> Any:
    """An enum value's name from its full name, its short name or its number.

    `daily` and `DAILY` name STATISTICS_PERIOD_DAILY: the enum's prefix (its
    name in UPPER_SNAKE_CASE) may be left out, and case does not matter.
    """
    prefix = enum.values[0].name.removesuffix("UNSPECIFIED") if enum.values else ""
    wanted = text.strip().upper()
    for value in enum.values:
        if wanted in (value.name, value.name.removeprefix(prefix)) or wanted == str(value.number):
            return value.name
    return None


def _enum_choices(enum: EnumDescriptor) -> str:
    prefix = enum.values[0].name.removesuffix("UNSPECIFIED") if enum.values else ""
    return ", ".join(
        value.name.removeprefix(prefix).lower()
        for value in enum.values
        if not value.name.endswith("_UNSPECIFIED")
    )


def _json_value(field: Any, name: str, text: str) -> Any:
    """A query or path value as the JSON value of `field`, or Refused."""
    if field.type in _INTEGERS:
        low, high = _INTEGERS[field.type]
        try:
            number = int(text.strip(), 10)
        except ValueError:
            raise _bad_parameter(
                name, SEED_TEXTS.get(field.name, f"{name} must be an integer, not {_shown(text)}")
            ) from None
        if not low <= number <= high:
            raise _bad_parameter(
                name, SEED_TEXTS.get(field.name, f"{name} is out of range ({low} to {high})")
            )
        return number
    if field.type == FieldDescriptor.TYPE_BOOL:
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0"):
            raise _bad_parameter(name, f"{name} must be true or false, not {_shown(text)}")
        return lowered in ("true", "1")
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        try:
            number_f = float(text)
        except ValueError:
            number_f = math.nan
        if not math.isfinite(number_f):
            raise _bad_parameter(name, f"{name} must be a finite number, not {_shown(text)}")
        return number_f
    if field.type == FieldDescriptor.TYPE_ENUM:
        value = _enum_value(field.enum_type, text)
        if value is None:
            raise _bad_parameter(
                name, f"{name} must be one of {_enum_choices(field.enum_type)}, not {_shown(text)}"
            )
        return value
    return text  # strings, bytes (base64) and the well-known messages


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


def set_from_text(message: Message, name: str, texts: list[str]) -> None:
    """Set the (possibly nested, dotted) field `name` of `message` from text values."""
    target = message
    parts = name.split(".")
    for position, part in enumerate(parts):
        field = _field(target.DESCRIPTOR, part)
        if field is None:
            raise _unknown_parameter(name, message.DESCRIPTOR)
        last = position == len(parts) - 1
        is_message = field.type == FieldDescriptor.TYPE_MESSAGE
        scalar_message = is_message and field.message_type.full_name in _SCALAR_MESSAGES
        if not last:
            if not is_message or field.is_repeated or scalar_message:
                raise _unknown_parameter(name, message.DESCRIPTOR)
            target = getattr(target, field.name)
            continue
        if (is_message and not scalar_message) or (field.message_type and field.is_repeated):
            raise _bad_parameter(
                name, f"{name} is a structured field: send it in a JSON body, not as text"
            )
        if not field.is_repeated and len(texts) > 1:
            raise _bad_parameter(name, f"{name} is given {len(texts)} times; give it once")
        values = [_json_value(field, name, text) for text in texts]
        try:
            json_format.ParseDict({field.name: values if field.is_repeated else values[0]}, target)
        except json_format.ParseError:
            hint = _SCALAR_MESSAGES.get(field.message_type.full_name if is_message else "", "")
            raise _bad_parameter(
                name, f"{name} must be {hint or 'a valid value'}, not {_shown(texts[0])}"
            ) from None


def _unknown_parameter(name: str, descriptor: Descriptor) -> Refused:
    known = ", ".join(field.name for field in descriptor.fields)
    return _bad_parameter(name, f"unknown parameter {name!r}; this route accepts: {known}")


def set_query(message: Message, query: Iterable[tuple[str, str]], bound: set[str]) -> None:
    """Set the fields the query string names (a field the path binds may not be repeated)."""
    grouped: dict[str, list[str]] = {}
    for name, value in query:
        grouped.setdefault(name, []).append(value)
    for name, texts in grouped.items():
        if _canonical(message.DESCRIPTOR, name) in bound:
            raise _bad_parameter(name, f"{name} is part of the path; do not repeat it in the query")
        set_from_text(message, name, texts)


def _canonical(descriptor: Descriptor, name: str) -> str:
    """A dotted parameter name in proto field names (JSON names translated)."""
    out = []
    for part in name.split("."):
        field = _field(descriptor, part) if descriptor is not None else None
        out.append(field.name if field is not None else part)
        descriptor = field.message_type if field is not None else None
    return ".".join(out)


def parse_body(message: Message, body: bytes) -> None:
    """The JSON body into `message` (an empty body is an empty message)."""
    if not body.strip():
        return
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise refusal(
            code_pb2.INVALID_ARGUMENT,
            f"the request body is not JSON: {exc}",
            description="the body must be a JSON object",
        ) from None
    if not isinstance(document, dict):
        raise refusal(
            code_pb2.INVALID_ARGUMENT,
            "the request body must be a JSON object",
            description="the body must be a JSON object",
        )
    try:
        json_format.ParseDict(document, message)
    except json_format.ParseError as exc:
        raise refusal(
            code_pb2.INVALID_ARGUMENT,
            f"the request body is not a valid {message.DESCRIPTOR.name}: {exc}",
            description=str(exc),
        ) from None


def bind_path(message: Message, variables: Mapping[str, str]) -> None:
    """Set the fields the path binds; a body naming another value is refused."""
    for name, text in variables.items():
        before = _current_text(message, name)
        set_from_text(message, name, [text])
        after = _current_text(message, name)
        if before not in ("", after):
            raise _bad_parameter(
                name, f"{name} is {after!r} in the path but {before!r} in the body; send one"
            )


def _current_text(message: Message, name: str) -> str:
    target: Any = message
    for part in name.split("."):
        target = getattr(target, part)
    return str(target) if target not in (0, "", False) else ""


# -- answers --------------------------------------------------------------------------


def to_json(message: Message) -> bytes:
    """An answer in protobuf's canonical JSON mapping, fields at their defaults included:
    a usage of zero reads as 0, not as an absent field."""
    return json.dumps(
        json_format.MessageToDict(message, always_print_fields_with_no_presence=True),
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()


def status_json(status: status_pb2.Status) -> bytes:
    return json.dumps(
        json_format.MessageToDict(status), ensure_ascii=False, separators=(",", ":")
    ).encode()


# Google's mapping of canonical codes to HTTP statuses (google/rpc/code.proto).
HTTP_STATUS = {
    code_pb2.OK: 200,
    code_pb2.CANCELLED: 499,
    code_pb2.UNKNOWN: 500,
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.DEADLINE_EXCEEDED: 504,
    code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409,
    code_pb2.PERMISSION_DENIED: 403,
    code_pb2.UNAUTHENTICATED: 401,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.FAILED_PRECONDITION: 400,
    code_pb2.ABORTED: 409,
    code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNIMPLEMENTED: 501,
    code_pb2.INTERNAL: 500,
    code_pb2.UNAVAILABLE: 503,
    code_pb2.DATA_LOSS: 500,
}


def http_status(code: int) -> int:
    return HTTP_STATUS.get(code, 500)


def retry_after_seconds(status: status_pb2.Status) -> int | None:
    """Whole seconds (rounded up) of the status's RetryInfo, if it has one."""
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            milliseconds: int = info.retry_delay.ToMilliseconds()
            return max(1, math.ceil(milliseconds / 1000))
    return None


def status_of(grpc_status: grpc.Status) -> status_pb2.Status:
    """The google.rpc.Status a handler aborted with (its details included)."""
    for key, value in grpc_status.trailing_metadata or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    code: grpc.StatusCode = grpc_status.code
    return status_pb2.Status(code=code.value[0], message=grpc_status.details or "")
