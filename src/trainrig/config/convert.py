"""Config values from YAML or ``--set`` text to the types the schema declares (one converter per type)."""
from __future__ import annotations

import math
import types
from typing import Any, Literal, Union, get_args, get_origin

import yaml

class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _mapping_without_duplicates(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key '{key}' is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml(text: str) -> Any:
    """``yaml.load`` with the strict safe loader: no Python objects, no duplicate keys."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if _is_optional(tp):
        inner = [a for a in get_args(tp) if a is not type(None)][0]
        return f"{type_name(inner)} or null"
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"list of {type_name(get_args(tp)[0])}"
    if tp is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def convert(value: Any, tp: Any, from_text: bool) -> Any:
    """Convert ``value`` to ``tp`` or raise ValueError with what was expected."""
    if _is_optional(tp):
        if value is None or (from_text and str(value).strip().lower() in ("null", "none", "~")):
            return None
        inner = [a for a in get_args(tp) if a is not type(None)][0]
        return convert(value, inner, from_text)
    if get_origin(tp) in (Union, types.UnionType):  # try each arm in order: devices: 2 | auto | [cpu, cpu]
        for arm in get_args(tp):
            try:
                return convert(value, arm, from_text)
            except ValueError:
                pass
        raise ValueError(f"expected {type_name(tp)}")
    if get_origin(tp) is list:
        if from_text and isinstance(value, str):
            try:
                value = load_yaml(value)
            except yaml.YAMLError:
                raise ValueError("expected a list like [a, b]") from None
        if not isinstance(value, list):
            raise ValueError("expected a list like [a, b]")
        (inner,) = get_args(tp)
        return [convert(v, inner, from_text) for v in value]
    if get_origin(tp) is Literal:
        allowed = get_args(tp)
        text = str(value) if value is not None else None
        if text in allowed:
            return text
        raise ValueError(f"expected {type_name(tp)}")
    if tp in _SCALARS:
        return _SCALARS[tp](value, from_text)
    raise ValueError(f"unsupported type {tp}")


def _to_bool(value: Any, from_text: bool) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError("expected true or false")


def _to_number(kind: type, expected: str) -> Any:
    """int or float from a number or a string (YAML 1.1 reads "1e-3" as a string); 1.5 is no int."""
    def to_number(value: Any, from_text: bool) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(expected)
        try:
            if isinstance(value, str):
                value = kind(value.strip())
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(expected)
            number = kind(value)
        except (ValueError, OverflowError):
            raise ValueError(expected) from None
        if kind is float and not math.isfinite(number):
            raise ValueError("expected a finite number")
        return number
    return to_number


def _to_str(value: Any, from_text: bool) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError("expected a string")


def _to_dict(value: Any, from_text: bool) -> dict:
    """A free-form mapping (tune.search_space, a callback spec); its owner validates the content."""
    if from_text and isinstance(value, str):
        try:
            value = load_yaml(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if isinstance(value, dict):
        return value
    raise ValueError("expected a mapping")


_SCALARS = {bool: _to_bool, int: _to_number(int, "expected an integer"), float: _to_number(float, "expected a number"),
            str: _to_str, dict: _to_dict}


