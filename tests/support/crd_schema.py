"""What the API server does with a CRD's schema, done offline: defaulting, schema validation, CEL rules.

Kubernetes applies, in order: pruning/strict field validation, structural defaulting, OpenAPI validation,
then `x-kubernetes-validations` CEL rules. These helpers repeat that order so tests can check that the
CRD rejects what the pydantic models reject, without a cluster.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import celpy
import jsonschema

Json = Any


def closed(schema: Json) -> Json:
    """The schema as `kubectl apply` with strict field validation sees it: unknown fields are errors."""
    schema = copy.deepcopy(schema)

    def close(node: Json) -> None:
        if not isinstance(node, dict):
            return
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for sub in node.get("properties", {}).values():
            close(sub)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                close(node[key])

    close(schema)
    return schema


def apply_defaults(schema: Json, value: Json) -> Json:
    """Structural defaulting: fill absent properties that have a default, recursing into what exists."""
    value = copy.deepcopy(value)

    def walk(node: Json, obj: Json) -> None:
        if isinstance(obj, dict):
            for name, sub in node.get("properties", {}).items():
                if name not in obj and "default" in sub:
                    obj[name] = copy.deepcopy(sub["default"])
                if name in obj:
                    walk(sub, obj[name])
            extra = node.get("additionalProperties")
            if isinstance(extra, dict):
                for key in obj:
                    if key not in node.get("properties", {}):
                        walk(extra, obj[key])
        elif isinstance(obj, list) and isinstance(node.get("items"), dict):
            for item in obj:
                walk(node["items"], item)

    walk(schema, value)
    return value


def _rules(schema: Json, value: Json, path: str) -> Iterator[tuple[str, str, Json]]:
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule, value
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                yield from _rules(sub, value[name], f"{path}.{name}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield from _rules(schema["items"], item, f"{path}[{index}]")


_CEL = celpy.Environment()


def cel_violations(schema: Json, value: Json) -> list[str]:
    """Messages of every CEL rule that evaluates to false, as `path: message`."""
    failures = []
    for path, rule, node in _rules(schema, value, ""):
        program = _CEL.program(_CEL.compile(rule["rule"]))
        if not bool(program.evaluate({"self": celpy.json_to_cel(node)})):
            failures.append(f"{path.lstrip('.')}: {rule['message']}")
    return failures


def api_server_violations(crd: Json, manifest: Json) -> list[str]:
    """Everything the API server would reject in `manifest`, in the order it checks."""
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    strict = jsonschema.Draft4Validator(closed(schema))
    problems = [
        f"{'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in strict.iter_errors(manifest)
    ]
    if problems:
        return problems
    defaulted = apply_defaults(schema, manifest)
    problems = [
        f"{'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in jsonschema.Draft4Validator(schema).iter_errors(defaulted)
    ]
    return problems or cel_violations(schema, defaulted)
