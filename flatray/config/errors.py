"""What every config module shares: the error users see, its wording, reading YAML, and the dotted-key helpers.

Errors name the key, the bad value and what is allowed (`explain` turns pydantic's errors into those lines). Run and
sweep files and --set values are read by `read_mapping` / `parse_overrides`, which turn every way a file can be
unreadable (binary, not UTF-8, empty, invalid YAML, duplicate keys, aliases that explode) into one ConfigError line.
Keys can be dotted (`optimizer.rho`) in overrides, searches and experiment configs; the helpers here are the only
code that reads or writes them.
"""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
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
            lines.append(f"  {info['loc']}: got {short_repr(info['value'])}; expected {info['expected']}")
            continue
        key = ".".join(str(p) for p in loc) or "<top level>"
        value = short_repr(e.get("input"))
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
            lines.append(f"  {key}: got {value}; expected {msg}")
    return "\n".join(lines)


def short_repr(value: Any) -> str:
    """A value in an error message: its repr, cut short (a whole list of thousands of values helps nobody)."""
    text = repr(value)
    return text if len(text) <= 120 else text[:100] + f"... ({len(text):,} characters)"


# ------------------------------------------------------------------------------------------------- reading YAML

MAX_FILE_BYTES = 1 << 20  # a run or sweep file is written by hand: 1 MiB is thousands of grid values
MAX_DEPTH = 32  # levels of nesting (a sweep file needs about 7)
MAX_NODES = 1_000_000  # values once aliases (*name) are expanded: guards against alias bombs


class _Unreadable(Exception):
    """What is wrong with a YAML text, in one line (read_mapping and parse_overrides say where it came from)."""


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load for config files: dates stay the text they are written as, and tags that are not plain data
    (!!binary, !!set) are errors (keys are checked by _check_nodes, before anything is constructed)."""

    def _not_plain(self, node):
        raise _Unreadable(f"line {node.start_mark.line + 1}: the tag {node.tag.rsplit(':', 1)[-1]!r} is not "
                          f"supported; expected plain values (strings, numbers, booleans, null, lists, mappings)")


_StrictLoader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)
for _tag in ("binary", "set", "omap", "pairs"):
    _StrictLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _StrictLoader._not_plain)
_STRING_KEYS = ("tag:yaml.org,2002:str", "tag:yaml.org,2002:timestamp")
_MERGE = "tag:yaml.org,2002:merge"


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line error as one line: what and where."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return f"not valid YAML: {', '.join(filter(None, [err.context, err.problem]))}{where}"
    if isinstance(err, yaml.reader.ReaderError):
        return f"not valid YAML: character #x{err.character:04x} at position {err.position} is not allowed"
    return f"not valid YAML: {str(err).splitlines()[0] if str(err) else type(err).__name__}"


def _check_keys(node: yaml.MappingNode) -> None:
    """What yaml.safe_load lets pass silently: a duplicate key (YAML keeps the last one) and a key that is not a
    string (`on:` and `yes:` read as True, `1:` as a number)."""
    first_line: dict[str, int] = {}
    for key_node, _ in node.value:
        line = key_node.start_mark.line + 1
        if key_node.tag == _MERGE:  # `<<: *anchor`: the keys it brings may be overridden here
            continue
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in _STRING_KEYS:
            written = repr(key_node.value) if isinstance(key_node, yaml.ScalarNode) else f"at column " \
                f"{key_node.start_mark.column + 1}"
            raise _Unreadable(f"line {line}: the key {written} is not a string ({key_node.tag.rsplit(':', 1)[-1]}); "
                              f"expected a name (quote it if it is one)")
        if key_node.value in first_line:
            raise _Unreadable(f"line {line}: duplicate key {key_node.value!r} (first at line "
                              f"{first_line[key_node.value]}); expected each key once (YAML would keep only the last)")
        first_line[key_node.value] = line


def _check_nodes(node, depth: int, seen: dict) -> tuple[int, int]:
    """(values, levels) of a composed YAML node once its aliases are expanded, checking the keys of its mappings;
    raises when either count is too large (an alias that contains itself is infinitely deep)."""
    if id(node) in seen:
        size, height = seen[id(node)]
    else:
        if depth > MAX_DEPTH:
            raise _Unreadable(f"line {node.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep (or an "
                              f"alias contains itself); expected a flat config")
        children = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            _check_keys(node)
            children = [n for pair in node.value for n in pair]
        size, height = 1, 1
        for child in children:
            child_size, child_height = _check_nodes(child, depth + 1, seen)
            size, height = size + child_size, max(height, child_height + 1)
        seen[id(node)] = (size, height)
    if size > MAX_NODES:
        raise _Unreadable(f"more than {MAX_NODES:,} values once its aliases (*name) are expanded; expected a config")
    if depth + height - 1 > MAX_DEPTH:
        raise _Unreadable(f"line {node.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep once its "
                          f"aliases are expanded; expected a flat config")
    return size, height


def _load_yaml(text: str) -> Any:
    """One YAML document of plain data, or _Unreadable."""
    loader = None
    try:
        loader = _StrictLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, 1, {})
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise _Unreadable(_yaml_problem(err)) from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise _Unreadable(f"a value cannot be read ({err})") from None
    except RecursionError:  # PyYAML composes recursively
        raise _Unreadable(f"nested more than {MAX_DEPTH} levels deep; expected a flat config") from None
    finally:
        if loader is not None:
            loader.dispose()


def exists(path: str | Path, test=Path.exists) -> bool:
    """`test` (exists, is_file, ...) of a path as written (~ expanded); False for what cannot name a file here (an
    unknown ~user, a name too long, a NUL byte) instead of an exception."""
    try:
        return test(Path(path).expanduser())
    except (OSError, RuntimeError, ValueError):
        return False


def read_mapping(path: Path, what: str, example: str) -> dict:
    """The mapping a YAML file holds, or a ConfigError of one line for a file that is not a text file of one YAML
    mapping (`what` names the kind of file, `example` shows its first keys)."""
    def bad(problem: str) -> ConfigError:
        return ConfigError(f"invalid {what} ({path}): {problem}")

    try:
        if path.is_dir():
            raise bad("is a folder; expected a YAML file")
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise bad(f"cannot be read ({err.strerror or type(err).__name__})") from None
    if len(data) > MAX_FILE_BYTES:
        raise bad(f"larger than {MAX_FILE_BYTES >> 20} MiB; expected a YAML file written by hand")
    if b"\0" in data:
        raise bad(f"is a binary file (a NUL byte at offset {data.index(0)}); expected YAML text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise bad(f"is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); expected a YAML file "
                  f"in UTF-8") from None
    try:
        tree = _load_yaml(text)
    except _Unreadable as err:
        raise bad(str(err)) from None
    if tree is None:
        raise bad(f"is empty; expected a mapping of keys, e.g. {example}")
    if not isinstance(tree, dict):
        raise bad(f"expected a mapping of keys at the top level (e.g. {example}), got a {type(tree).__name__}")
    return tree


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """tree['a']['b'] = value for 'a.b', creating sections on the way."""
    *parents, last = dotted.split(".")
    if len(parents) >= MAX_DEPTH:
        raise ConfigError(f"--set {short_repr(dotted)}: more than {MAX_DEPTH} dotted parts; expected a config key")
    for p in parents:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is a value ({node!r}), not a section")
        tree = node
    tree[last] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """`--set key=value` strings as (dotted key, YAML value); an empty value is null."""
    out = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not all(part.strip() for part in key.split(".")):
            raise ConfigError(f"--set {pair!r}: expected key=value with a dotted key, e.g. optimizer.rho=0.1")
        try:
            value = _load_yaml(raw)
        except _Unreadable as err:
            raise ConfigError(f"--set {pair!r}: cannot read the value {raw!r}: {err}; expected a YAML value, e.g. "
                              f"0.1, sam, [1, 2] or {{name: sam}}") from None
        out.append((key, value))
    return out


def merge(base: dict, overrides: dict) -> dict:
    """Deep merge into a copy of `base`; dotted keys in `overrides` address nested sections."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if key.count(".") >= MAX_DEPTH:  # each part is a level of nesting
            raise ConfigError(f"key {short_repr(key)}: more than {MAX_DEPTH} dotted parts; expected a run-config key")
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
