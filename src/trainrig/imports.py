"""Import a class named in the config (``package.module.Class``): imported, never evaluated."""
from __future__ import annotations

import importlib
from typing import Any

from trainrig.errors import ConfigError


def import_object(path: Any, key: str) -> Any:
    """The object ``path`` names; a missing module or attribute is a ConfigError naming ``key``."""
    if not isinstance(path, str) or "." not in path.strip("."):
        raise ConfigError(f"{key}: expected package.module.Class, got {path!r}")
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{key}: cannot import {path} ({exc})") from None


def import_class(path: Any, key: str, base: type, kind: str) -> type:
    """The class ``path`` names, checked to be a subclass of ``base`` before anything is constructed: a
    ``class_path`` naming another callable (``subprocess.Popen``, ``os.system``) is refused unrun."""
    obj = import_object(path, key)
    if not (isinstance(obj, type) and issubclass(obj, base)):
        what = "another class" if isinstance(obj, type) else f"a {type(obj).__name__}"
        raise ConfigError(f"{key}: {path} is not a subclass of {kind} (it is {what}); nothing was built")
    return obj


def construct(cls: Any, args: dict, key: str) -> Any:
    """``cls(**args)``; wrong arguments are a ConfigError naming ``key`` (the init_args)."""
    try:
        return cls(**args)
    except TypeError as exc:
        raise ConfigError(f"{key}: {exc}") from None
