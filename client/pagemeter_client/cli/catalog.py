"""Plans as code: a YAML catalog of plan templates and the organizations that use them.

    templates:
      business:                 # a Plan without org_id, in the .proto field names
        name: Business
        timezone: Europe/Berlin
        billing_anchor: 2026-01-31T10:00:00Z        # optional: periods from its local day
        billing_interval: BILLING_INTERVAL_MONTH    # and time (or BILLING_INTERVAL_YEAR)
        metrics:
          - metric: pages
            contract_quota: 2000
            overage_allowed: true
            overage_price_per_unit: "0.028"
            windows:
              - {window: WINDOW_DAY, limit: 200}
            alerts:             # notification thresholds (absent: 80 and 100 %)
              quota_percents: [50, 80, 100]
              grant_expiring_within: 604800s
    organizations:
      acme: business            # organization id: template name

Values are as protobuf JSON writes them: enums by name, billing_anchor as an RFC
3339 time with its UTC offset (what YAML would read as a timestamp is kept as that
text), a Duration as seconds and "s" (604800s). Every problem is reported as
FILE:LINE: what, with the line of the value at fault, before anything is sent; so
are the server's own checks of each plan (they run with SetPlan's validate_only
and name a field, which is mapped back to its line).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import descriptor, json_format

from pagemeter.v1 import plan_pb2
from pagemeter_client.cli.common import InputProblem

# Fields a template may not set: the organization comes from `organizations`, the
# rest is the server's.
NOT_IN_TEMPLATES = {"org_id", "version", "updated_at"}
SECTIONS = ("templates", "organizations")


class _Loader(yaml.SafeLoader):
    """YAML without its own timestamps: `billing_anchor: 2026-01-31T10:00:00Z` stays
    the text protobuf JSON reads (a datetime would lose its offset's spelling and is
    no JSON value), and a date alone is refused by the plan's parser, not guessed."""


def _timestamp_as_text(loader: _Loader, node: yaml.ScalarNode) -> str:
    return loader.construct_scalar(node)


_Loader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp_as_text)


@dataclass(frozen=True)
class Template:
    name: str
    plan: plan_pb2.Plan
    node: yaml.Node


@dataclass(frozen=True)
class Catalog:
    path: str
    templates: dict[str, Template]
    organizations: dict[str, str]  # organization id -> template name

    def where(self, template: str, field_path: str) -> str:
        """FILE:LINE of a server-named field of a template's plan ("plan.metrics[0].limit")."""
        return _at(self.path, _locate(self.templates[template].node, field_path))


def _locate(node: yaml.Node, field_path: str) -> yaml.Node:
    """The node of a field path ("plan.metrics[0].limit"), or of its nearest ancestor
    the template has."""
    for step in _steps(field_path):
        child = _child(node, step)
        if child is None:
            break
        node = child
    return node


def _steps(field_path: str) -> list[str]:
    return re.findall(r"[A-Za-z_]+|\[\d+\]", field_path.removeprefix("plan."))


def load_catalog(path: str) -> Catalog:
    """Read and check a catalog file; InputProblem names the file and line of any fault."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        root = yaml.compose(text, Loader=_Loader)
    except OSError as problem:
        raise InputProblem(f"cannot read {path}: {problem}") from None
    except yaml.MarkedYAMLError as problem:
        line = problem.problem_mark.line + 1 if problem.problem_mark else 0
        raise InputProblem(f"{path}:{line}: not YAML: {problem.problem}") from None
    if not isinstance(root, yaml.MappingNode):
        raise InputProblem(f"{path}:1: a catalog is a mapping with {' and '.join(SECTIONS)}")
    sections = _mapping(path, root)
    for key, (key_node, _) in sections.items():
        if key not in SECTIONS:
            raise InputProblem(
                f"{_at(path, key_node)}: unknown section {key!r} (sections: {', '.join(SECTIONS)})"
            )
    templates = {
        name: _template(path, name, node)
        for name, (_, node) in _mapping(path, _section(sections, "templates")).items()
    }
    organizations: dict[str, str] = {}
    for org, (_key, value) in _mapping(path, _section(sections, "organizations")).items():
        if not isinstance(value, yaml.ScalarNode) or value.value not in templates:
            known = ", ".join(sorted(templates)) or "none"
            raise InputProblem(
                f"{_at(path, value)}: organization {org!r} names no template of this file "
                f"(templates: {known})"
            )
        organizations[org] = value.value
    return Catalog(path, templates, organizations)


def _section(sections: dict[str, tuple[yaml.Node, yaml.Node]], name: str) -> yaml.Node | None:
    """A section's value node; None when the catalog leaves it out."""
    return sections[name][1] if name in sections else None


def _at(path: str, node: yaml.Node | None) -> str:
    return f"{path}:{node.start_mark.line + 1 if node is not None else 1}"


def _mapping(path: str, node: yaml.Node | None) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """A mapping node's entries by key; an absent section is empty."""
    if node is None:
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise InputProblem(f"{_at(path, node)}: expected a mapping of names")
    entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key, value in node.value:
        if key.value in entries:
            raise InputProblem(f"{_at(path, key)}: {key.value!r} appears twice")
        entries[str(key.value)] = (key, value)
    return entries


def _template(path: str, name: str, node: yaml.Node) -> Template:
    _check_fields(path, node, plan_pb2.Plan.DESCRIPTOR, top=True)
    value = _Loader("").construct_document(node)
    plan = plan_pb2.Plan()
    try:
        json_format.ParseDict(value, plan)
    except json_format.ParseError as problem:
        raise InputProblem(_parse_problem(path, name, node, str(problem))) from None
    return Template(name, plan, node)


def _parse_problem(path: str, name: str, node: yaml.Node, problem: str) -> str:
    """A value protobuf JSON could not read, at its line and named by its field path
    ("Failed to parse window field: Invalid enum value X ... at Plan.metrics[0]...")."""
    found = re.search(r" at Plan\.(\S+?)\.*$", problem)
    if found is None:
        return f"{_at(path, node)}: template {name!r}: {problem}"
    field_path = found.group(1)
    at = _locate(node, field_path)
    reason = re.sub(r"^(Failed to parse \w+ field: )+", "", problem[: found.start()])
    field = _field(field_path)
    written = f" (got {at.value!r})" if isinstance(at, yaml.ScalarNode) else ""
    if field is not None and field.enum_type is not None:
        names = [v.name for v in field.enum_type.values if not v.name.endswith("_UNSPECIFIED")]
        reason = f"must be {', '.join(names[:-1])} or {names[-1]}{written}"
    elif field is not None and _is_timestamp(field):
        reason = (
            "must be an RFC 3339 time with a UTC offset, such as 2026-01-31T10:00:00Z "
            f"or 2026-01-31T11:00:00+01:00{written}"
        )
    elif field is not None and _is_duration(field):
        reason = f"must be a number of seconds and 's', such as 604800s (7 days){written}"
    return f"{_at(path, at)}: template {name!r}: plan.{field_path}: {reason}"


def _field(field_path: str) -> descriptor.FieldDescriptor | None:
    """The Plan field (of a Plan or a message within) a field path names."""
    message: Any = plan_pb2.Plan.DESCRIPTOR
    field = None
    for step in _steps(field_path):
        if step.startswith("["):
            continue
        if message is None or step not in message.fields_by_name:
            return None
        field = message.fields_by_name[step]
        message = field.message_type
    return field


def _check_fields(path: str, node: yaml.Node, message: Any, top: bool = False) -> None:
    """Every key of a mapping node is a field of `message` (recursively), by its
    .proto name; the first that is not is reported at its line."""
    if not isinstance(node, yaml.MappingNode):
        raise InputProblem(f"{_at(path, node)}: expected a mapping of {message.name} fields")
    for key, value in node.value:
        field = message.fields_by_name.get(key.value)
        if field is None or (top and key.value in NOT_IN_TEMPLATES):
            hint = "set by the server or by `organizations`" if field else "unknown field"
            raise InputProblem(f"{_at(path, key)}: {message.name}.{key.value}: {hint}")
        if field.type != descriptor.FieldDescriptor.TYPE_MESSAGE or _json_scalar(field):
            continue
        children = value.value if isinstance(value, yaml.SequenceNode) else [value]
        for child in children:
            if isinstance(child, yaml.Node):
                _check_fields(path, child, field.message_type)


# Messages protobuf JSON writes as a string (a Timestamp: RFC 3339 text; a Duration:
# seconds and "s"), not a mapping.
_JSON_STRINGS = {"google.protobuf.Timestamp", "google.protobuf.Duration"}


def _is_timestamp(field: descriptor.FieldDescriptor) -> bool:
    message = field.message_type
    return message is not None and message.full_name == "google.protobuf.Timestamp"


def _is_duration(field: descriptor.FieldDescriptor) -> bool:
    message = field.message_type
    return message is not None and message.full_name == "google.protobuf.Duration"


def _json_scalar(field: descriptor.FieldDescriptor) -> bool:
    message = field.message_type
    return message is not None and message.full_name in _JSON_STRINGS


def _child(node: yaml.Node, step: str) -> yaml.Node | None:
    if step.startswith("["):
        index = int(step[1:-1])
        if isinstance(node, yaml.SequenceNode) and index < len(node.value):
            child: yaml.Node = node.value[index]
            return child
        return None
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if key.value == step:
                found: yaml.Node = value
                return found
    return None


def export_document(plans: list[plan_pb2.Plan]) -> str:
    """A catalog of the plans as they are: one template per organization, named after it."""
    templates: dict[str, Any] = {}
    organizations: dict[str, str] = {}
    for plan in sorted(plans, key=lambda p: p.org_id):
        fields = _plain_numbers(
            json_format.MessageToDict(plan, preserving_proto_field_name=True), plan.DESCRIPTOR
        )
        for name in NOT_IN_TEMPLATES:
            fields.pop(name, None)
        templates[plan.org_id] = fields
        organizations[plan.org_id] = plan.org_id
    document = {"templates": templates, "organizations": organizations}
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


_WIDE_INTEGERS = {
    descriptor.FieldDescriptor.CPPTYPE_INT64,
    descriptor.FieldDescriptor.CPPTYPE_UINT64,
}


def _plain_numbers(fields: dict[str, Any], message: Any) -> dict[str, Any]:
    """Protobuf's JSON writes 64-bit integers as strings ("2000"); a catalog is
    written for people, so they become numbers again (ParseDict reads both)."""
    plain: dict[str, Any] = {}
    for name, value in fields.items():
        field = message.fields_by_name[name]
        if field.cpp_type in _WIDE_INTEGERS:
            value = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.type == descriptor.FieldDescriptor.TYPE_MESSAGE and field.message_type.fields:
            if isinstance(value, list):
                value = [_plain_numbers(v, field.message_type) for v in value]
            elif isinstance(value, dict) and field.message_type.name != "Timestamp":
                value = _plain_numbers(value, field.message_type)
        plain[name] = value
    return plain
