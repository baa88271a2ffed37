"""What every config module shares: the error users see, its wording, and the dotted-key helpers.

Errors name the key, the bad value and what is allowed (`explain` turns pydantic's errors into those lines). Keys
can be dotted (`optimizer.rho`) in overrides, searches and experiment configs; the helpers here are the only code
that reads or writes them.
"""

from __future__ import annotations

import copy
import difflib
import typing
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A run or sweep file that cannot be run. The message is meant for the person who wrote the file."""


def _submodel(annotation) -> type[BaseModel] | None:
    """The section model behind a field's annotation: Model, Model | None, or dict[str, Model] (its values)."""
    candidates = [annotation, *typing.get_args(annotation)]
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at `loc` (the path of an unknown key), for the error message."""
    parts = list(loc[:-1])
    while parts:
        part = parts.pop(0)
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        ann = field.annotation
        if typing.get_origin(ann) is dict:  # e.g. experiments: dict[str, Experiment]: skip the name
            parts = parts[1:]
            ann = typing.get_args(ann)[1]
        sub = _submodel(ann)
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def explain(err: ValidationError, source: str, root: type[BaseModel], what: str = "run config") -> str:
    """pydantic's errors as one line per key: the key, the value, what is allowed (and a likely typo's fix)."""
    lines = [f"invalid {what} ({source}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        if e["type"] == "cross_field":
            info = e["ctx"]
            lines.append(f"  {info['loc']}: got {info['value']!r}; expected {info['expected']}")
            continue
        key = ".".join(str(p) for p in loc) or "<top level>"
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(root, loc)
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            lines.append(
                f"  {key}: unknown key; allowed here: {', '.join(allowed)}"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
            )
        elif e["type"] == "missing":
            lines.append(f"  {key}: missing; this key is required")
        else:
            msg = e["msg"].removeprefix("Value error, ")  # our validators say what is expected
            if msg.startswith("Input should"):  # pydantic's own: "Input should be ..."
                msg = msg.removeprefix("Input should be ")
            lines.append(f"  {key}: got {value!r}; expected {msg}")
    return "\n".join(lines)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """tree['a']['b'] = value for 'a.b', creating sections on the way."""
    *parents, last = dotted.split(".")
    for p in parents:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is a value ({node!r}), not a section")
        tree = node
    tree[last] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    out = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. optimizer.rho=0.1")
        out.append((key.strip(), yaml.safe_load(raw) if raw else None))
    return out




def merge(base: dict, overrides: dict) -> dict:
    """Deep merge into a copy of `base`; dotted keys in `overrides` address nested sections."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        node, *rest = key.split(".")
        if rest:
            value = {".".join(rest): value}
        if isinstance(value, dict) and isinstance(out.get(node), dict):
            out[node] = merge(out[node], value)
        else:
            out[node] = merge({}, value) if isinstance(value, dict) else copy.deepcopy(value)
    return out


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; dotted keys stay as they are."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def get_dotted(tree: dict, dotted: str, default: Any = None) -> Any:
    """tree['a']['b'] for 'a.b' (or a literal 'a.b' key), else `default`."""
    if dotted in tree:
        return tree[dotted]
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def field_exists(model: type[BaseModel], dotted: str) -> bool:
    """Whether `dotted` names a field of `model` (through its nested sections)."""
    for part in dotted.split("."):
        field = model.model_fields.get(part)
        if field is None:
            return False
        sub = _submodel(field.annotation)
        if sub is None:
            return part == dotted.split(".")[-1]
        model = sub
    return True
