"""Write the OpenAPI 3.1 document of the HTTP/JSON API from the .proto files.

    python tools/openapi.py          # write server/pagemeter_server/gateway/openapi.json
    python tools/openapi.py --check  # exit 1 when the committed document is stale

The routes are the ones the server serves (pagemeter_server.gateway.routes, read
from the contract's google.api.http annotations); the schemas are the messages in
protobuf's canonical JSON mapping; descriptions are the .proto comments, read
from a descriptor set protoc writes with source information.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor

from pagemeter_server import __version__
from pagemeter_server.gateway.routes import Route, routes

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "server" / "pagemeter_server" / "gateway" / "openapi.json"
PROTOS = ROOT / "protos"

# Descriptors as the upb runtime types them.
Descriptor = Any
EnumDescriptor = Any

# Messages whose JSON form is not an object (protobuf's JSON mapping).
WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
        "description": "A duration in seconds with an 's' suffix, such as '3600s'.",
    },
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
}
_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_SFIXED64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_FIXED64,
}
_INT32 = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_FIXED32,
}


def comments() -> dict[str, str]:
    """Leading comments of services' methods, messages, fields, enums and values, by full name."""
    sources = sorted(
        str(p.relative_to(PROTOS)) for p in (PROTOS / "pagemeter" / "v1").glob("*.proto")
    )
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "set.pb"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{PROTOS}",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *sources,
            ],
            check=True,
        )
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    found: dict[str, str] = {}
    for file in files.file:
        names = _names_by_path(file)
        for location in file.source_code_info.location:
            name = names.get(tuple(location.path))
            if name and location.leading_comments.strip():
                found[name] = " ".join(
                    line.strip() for line in location.leading_comments.strip().splitlines()
                )
    return found


def _names_by_path(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    """Source-info paths to full names (fields 4 message_type, 5 enum_type, 6 service)."""
    names: dict[tuple[int, ...], str] = {}

    def message(proto: descriptor_pb2.DescriptorProto, path: tuple[int, ...], prefix: str) -> None:
        full = f"{prefix}.{proto.name}"
        names[path] = full
        for i, field in enumerate(proto.field):
            names[(*path, 2, i)] = f"{full}.{field.name}"
        for i, nested in enumerate(proto.nested_type):
            message(nested, (*path, 3, i), full)
        for i, nested_enum in enumerate(proto.enum_type):
            enum(nested_enum, (*path, 4, i), full)

    def enum(proto: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], prefix: str) -> None:
        full = f"{prefix}.{proto.name}"
        names[path] = full
        for i, value in enumerate(proto.value):
            names[(*path, 2, i)] = f"{prefix}.{value.name}"

    for i, proto in enumerate(file.message_type):
        message(proto, (4, i), file.package)
    for i, proto_enum in enumerate(file.enum_type):
        enum(proto_enum, (5, i), file.package)
    for i, service in enumerate(file.service):
        for j, method in enumerate(service.method):
            names[(6, i, 2, j)] = f"{file.package}.{service.name}.{method.name}"
    return names


class Schemas:
    """components/schemas: each message reached, in protobuf's JSON mapping."""

    def __init__(self, described: dict[str, str]) -> None:
        self.described = described
        self.schemas: dict[str, Any] = {}

    def ref(self, descriptor: Descriptor) -> dict[str, Any]:
        if descriptor.full_name in WELL_KNOWN:
            return dict(WELL_KNOWN[descriptor.full_name])
        if descriptor.full_name not in self.schemas:
            self.schemas[descriptor.full_name] = {}  # placeholder: recursive messages
            self.schemas[descriptor.full_name] = self._object(descriptor)
        return {"$ref": f"#/components/schemas/{descriptor.full_name}"}

    def _object(self, descriptor: Descriptor) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "object", "properties": {}}
        if descriptor.full_name in self.described:
            schema["description"] = self.described[descriptor.full_name]
        for field in descriptor.fields:
            schema["properties"][field.json_name] = self.field(field)
        schema["additionalProperties"] = False
        return schema

    def field(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            schema: dict[str, Any] = {"type": "object", "additionalProperties": self.single(value)}
        elif field.is_repeated:
            schema = {"type": "array", "items": self.single(field)}
        else:
            schema = self.single(field)
        description = self.described.get(field.full_name)
        if description:
            schema = (
                {"allOf": [schema], "description": description}
                if "$ref" in schema
                else {**schema, "description": description}
            )
        return schema

    def single(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            return self.ref(field.message_type)
        if field.type == FieldDescriptor.TYPE_ENUM:
            return enum_schema(field.enum_type)
        if field.type in _INT64:
            # Written as strings (JSON numbers lose precision past 2^53); read either way.
            return {"type": ["string", "integer"], "format": "int64"}
        if field.type in _INT32:
            return {"type": "integer", "format": "int32"}
        if field.type == FieldDescriptor.TYPE_BOOL:
            return {"type": "boolean"}
        if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return {"type": "number"}
        if field.type == FieldDescriptor.TYPE_BYTES:
            return {"type": "string", "contentEncoding": "base64"}
        return {"type": "string"}


def enum_schema(enum: EnumDescriptor) -> dict[str, Any]:
    return {"type": "string", "enum": [value.name for value in enum.values]}


def operation(route: Route, schemas: Schemas, described: dict[str, str], suffix: str) -> Any:
    method = route.method
    op: dict[str, Any] = {
        "operationId": f"{method.containing_service.name}_{method.name}{suffix}",
        "tags": [method.containing_service.name],
        "summary": method.name,
    }
    if method.full_name in described:
        op["description"] = described[method.full_name]
    parameters = [_path_parameter(route, name, schemas) for name in route.path_fields]
    if route.body == "*":
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schemas.ref(method.input_type)}},
        }
    else:
        parameters.extend(_query_parameters(route, schemas))
    if parameters:
        op["parameters"] = parameters
    op["responses"] = {
        "200": {
            "description": "The answer.",
            "content": {"application/json": {"schema": schemas.ref(method.output_type)}},
        },
        "default": {
            "description": "A failure, as a google.rpc.Status (docs/http.md).",
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/google.rpc.Status"}}
            },
        },
    }
    return op


def _field_at(descriptor: Descriptor, dotted: str) -> Any:
    field = None
    for part in dotted.split("."):
        field = descriptor.fields_by_name[part]
        if field.message_type is not None:
            descriptor = field.message_type
    assert field is not None
    return field


def parameter_name(field_path: str) -> str:
    """A path variable's name in the document: its last field (`plan.org_id` ->
    `org_id`); dotted names are valid OpenAPI, but generators stumble on them."""
    return field_path.rsplit(".", 1)[-1]


def document_path(route: Route) -> str:
    path = route.template
    for name in route.path_fields:
        path = path.replace("{" + name + "}", "{" + parameter_name(name) + "}")
    return path


def _path_parameter(route: Route, name: str, schemas: Schemas) -> dict[str, Any]:
    field = _field_at(route.method.input_type, name)
    return {
        "name": parameter_name(name),
        "in": "path",
        "required": True,
        "schema": schemas.single(field),
    }


def _query_parameters(route: Route, schemas: Schemas) -> list[dict[str, Any]]:
    out = []
    fields: list[Any] = list(route.method.input_type.fields)
    for field in fields:
        if field.name in route.path_fields:
            continue
        if (
            field.type == FieldDescriptor.TYPE_MESSAGE
            and field.message_type.full_name not in WELL_KNOWN
        ):
            continue
        schema = schemas.field(field)
        if field.type == FieldDescriptor.TYPE_ENUM:
            # Queries also take the short names (daily for STATISTICS_PERIOD_DAILY).
            schema = {
                "type": "string",
                **({"description": schema["description"]} if "description" in schema else {}),
            }
        parameter: dict[str, Any] = {
            "name": field.name,
            "in": "query",
            "required": False,
            "schema": schema,
        }
        if field.is_repeated:
            parameter["explode"] = True
        out.append(parameter)
    return out


def document() -> dict[str, Any]:
    described = comments()
    schemas = Schemas(described)
    paths: dict[str, dict[str, Any]] = {}
    seen: dict[str, int] = {}
    for route in routes():
        # An RPC's additional bindings: CheckQuota, CheckQuota2...
        count = seen[route.method.full_name] = seen.get(route.method.full_name, 0) + 1
        suffix = "" if count == 1 else str(count)
        paths.setdefault(document_path(route), {})[route.verb.lower()] = operation(
            route, schemas, described, suffix
        )
    from google.rpc import status_pb2  # the failures' schema

    schemas.ref(status_pb2.Status.DESCRIPTOR)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pagemeter HTTP/JSON API",
            "version": __version__,
            "description": "Quota enforcement and usage metering for document-processing APIs: "
            "the RPCs of pagemeter's gRPC services over HTTP, in protobuf's canonical JSON "
            "mapping (docs/http.md). Generated from the .proto files by tools/openapi.py.",
        },
        "servers": [{"url": "http://127.0.0.1:8080"}],
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An admin or service token, or a tenant's API key (pmk_...).",
                },
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
            },
            "schemas": dict(sorted(schemas.schemas.items())),
        },
    }


def rendered() -> str:
    return json.dumps(document(), indent=1, sort_keys=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the document is stale")
    args = parser.parse_args()
    text = rendered()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run `make openapi` and commit it")
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
