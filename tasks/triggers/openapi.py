"""What `porter serve`'s OpenAPI document says that FastAPI cannot infer from the routes: the JSON
bodies they read themselves (job specs, hook payloads, checked by Porter's own validators, not by
pydantic). How each call authenticates comes from the security dependencies in `api.py`."""

from __future__ import annotations

import dataclasses
from typing import Any

from tasks.kinds import all_kinds
from tasks.kinds.base import JobKind

_JSON_TYPES = {"str": "string", "int": "integer", "bool": "boolean", "float": "number"}
_ITERATION = {"anyOf": [{"type": "integer"}, {"type": "string"}]}


def _field_schema(annotation: str) -> dict[str, Any]:
    """The JSON schema of a spec field from its annotation text (`str | None`, `tuple[X, ...]`)."""
    names = [name.strip() for name in str(annotation).split("|")]
    base = next(name for name in names if name != "None")
    if base.startswith(("tuple[", "list[")):
        schema: dict[str, Any] = {"type": "array", "items": {"type": "object"}}
    else:
        schema = {"type": _JSON_TYPES.get(base, "object")}
    return {"anyOf": [schema, {"type": "null"}]} if "None" in names else schema


def spec_schema(kind: JobKind) -> dict[str, Any]:
    """The JSON schema of `kind`'s job spec (its dataclass fields; `iteration` where the kind
    takes a checkpoint)."""
    properties, required = {}, []
    for field in dataclasses.fields(kind.spec_type):
        properties[field.name] = _field_schema(field.type)
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            required.append(field.name)
    properties["kind"] = {"type": "string", "enum": [kind.name]}
    if kind.checkpoint_field:
        properties["iteration"] = _ITERATION
    return {
        "title": f"{kind.name} job spec",
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def _body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    content = {"application/json": {"schema": schema}}
    return {"requestBody": {"required": True, "description": description, "content": content}}


def job_spec_body() -> dict[str, Any]:
    """`openapi_extra` of POST /v1/jobs: one job spec of any registered kind."""
    schema = {"oneOf": [spec_schema(kind) for kind in all_kinds().values()]}
    return _body(schema, "a job spec, as in batch files and profile exports (`kind` selects it)")


TRAINING_COMPLETE_BODY = _body(
    {
        "type": "object",
        "properties": {
            "profile": {"type": "string"},
            "checkpoint": {"type": "string", "description": "s3:// URI or absolute path"},
            "iteration": _ITERATION,
        },
        "required": ["profile", "checkpoint"],
        "additionalProperties": False,
    },
    "signed with X-Porter-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, t.body)>",
)

HUB_EVENT_BODY = _body(
    {
        "type": "object",
        "properties": {
            "event": {"type": "object", "properties": {"scope": {}, "action": {}}},
            "repo": {"type": "object", "properties": {"name": {}, "headSha": {}}},
        },
    },
    "a Hugging Face Hub webhook payload; `repo.content` updates of mapped repos are exported",
)
