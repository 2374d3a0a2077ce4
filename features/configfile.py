"""One loader for every config file: YAML or JSON (or a dict) into a nested, frozen config dataclass.

    load_config(TrainConfig, "configs/train.yaml", {"loader.batch_size": 256, "lr": None})

The file may hold any subset of the fields, nested sections included; what it leaves out keeps the
dataclass's default. Overrides are dotted keys applied on top (None means "not given"). Validation is
pydantic's, on the stdlib dataclasses as they are:

- unknown keys are refused: the dataclass is validated as the one field of a wrapper model whose config
  says extra="forbid"; the config dataclasses carry no pydantic config of their own, so every nested
  dataclass inherits it;
- types are strict, in pydantic's JSON mode: a string where a number is expected is an error, an integer
  where a float is expected is fine, lists become tuples, strings become Paths and enums.

Any problem is one ConfigError (a ValueError) on one line naming the source, the dotted key and what was
expected, e.g. `configs/train.yaml: loader.batch_sise: unknown key (expected one of batch_size, ...)`.
This module is the lowest layer's: it imports nothing of fin/, serving/ or jobs/.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

T = TypeVar("T")

# what a pydantic type error expected, in words (others fall back to pydantic's own message)
_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "bool_parsing": "true or false", "string_type": "a string", "dataclass_type": "a mapping",
    "dict_type": "a mapping", "tuple_type": "a list", "list_type": "a list", "path_type": "a path",
}


class ConfigError(ValueError):
    """A config that does not fit its dataclass; the message is one line."""


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, reading a number in exponent form without a dot (`lr: 1e-3`) as a number, as YAML
    1.2 and JSON do: the YAML 1.1 rules read it as text, which a number field then refused."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML or JSON file holds (an empty file is an empty mapping)."""
    path = Path(path)
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_Loader)
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                          f"{' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def load_config(cls: type[T], source: str | Path | Mapping[str, Any] | None = None,
                overrides: Mapping[str, Any] | None = None, *, label: str | None = None) -> T:
    """`cls` from a YAML/JSON file or a mapping (None: defaults only), with dotted `overrides` on top.
    `label` names the source in errors (default: the file, or the class for a mapping)."""
    if source is None or isinstance(source, Mapping):
        data = copy.deepcopy(dict(source or {}))
        label = label or cls.__name__
    else:
        data = read_config_file(source)
        label = label or str(source)
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    for key, value in given.items():
        _set_dotted(data, key, value, label)
    try:
        # JSON mode: YAML's and JSON's values are JSON's (a YAML date, unquoted, is read as its text)
        return _wrapper(cls).model_validate_json(json.dumps({"value": data}, default=_as_json)).value
    except ValidationError as e:
        raise ConfigError("; ".join(_describe(cls, error, label, given) for error in e.errors())) from None


def _as_json(value: Any) -> Any:
    """Values JSON has no type for: a YAML date as its text, a path as text, a numpy scalar as its number."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _set_dotted(data: dict, key: str, value: Any, label: str) -> None:
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{label}: {'.'.join(parents[:i + 1])}: expected a mapping, got {node!r}")
    node[leaf] = value


@functools.cache
def _wrapper(cls: type) -> type[BaseModel]:
    config = ConfigDict(extra="forbid", strict=True)
    return create_model(f"{cls.__name__}File", __config__=config, value=(cls, ...))


def _describe(cls: type, error: dict, label: str, overrides: Mapping[str, Any]) -> str:
    loc = error["loc"][1:]  # past the wrapper's one field
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if key in overrides:
        label = f"{label} (override)"
    kind = error["type"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        parent = _type_at(cls, loc[:-1])
        known = [f.name for f in dataclasses.fields(parent)] if dataclasses.is_dataclass(parent) else []
        return f"{label}: {key}: unknown key" + (f" (expected one of {', '.join(known)})" if known else "")
    if kind == "missing":
        return f"{label}: {key}: missing (required)"
    if kind == "value_error":  # the dataclass's own check (__post_init__) refused the values
        message = str(error["ctx"]["error"])
        return f"{label}: {key}: {message}" if key else f"{label}: {message}"
    expected = _EXPECTED.get(kind) or error["msg"].removeprefix("Input should be ")
    return f"{label}: {key}: expected {expected}, got {error['input']!r}"


def _type_at(cls: type, loc: tuple) -> Any:
    """The declared type at a path of field names, mapping keys and list positions (None: unknown)."""
    t: Any = cls
    for part in loc:
        t = _without_none(t)
        if dataclasses.is_dataclass(t):
            t = typing.get_type_hints(t).get(part)
        elif typing.get_origin(t) in (dict, Mapping):
            t = typing.get_args(t)[1]
        elif typing.get_origin(t) is tuple:
            args = typing.get_args(t)
            t = args[0] if len(args) == 2 and args[1] is Ellipsis else args[part]
        else:
            return None
    return _without_none(t)


def _without_none(t: Any) -> Any:
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(t) if a is not type(None)]
        return rest[0] if len(rest) == 1 else t
    return t
