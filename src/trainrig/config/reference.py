"""The config reference: every key with its type, default and help text, from the schema in config.py
(``trainer config keys``, docs/config.md)."""
from __future__ import annotations

import dataclasses

import yaml

from trainrig.config import Config, _hints, _join
from trainrig.config.convert import type_name as _type_name


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Rows of (key, type, default, help) for every key, nested sections flattened."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = _join(prefix, f.name)
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key))
        else:
            shown = yaml.safe_dump(getattr(cls(), f.name), default_flow_style=True).strip().removesuffix("\n...")
            rows.append((key, _type_name(tp), shown, f.metadata.get("help", "")))
    return rows


def markdown_reference() -> str:
    """docs/config.md: every key as a table row, generated from the schema (``make docs``)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("<", "\\<")

    lines = ["# Config reference", "",
             "Generated from the schema in `src/trainrig/config.py` by `make docs` (`trainer config keys "
             "--markdown`); a test keeps it in sync. Keys and schema defaults (the packaged YAML files override "
             "some). YAML and `--set` values are converted by the key's type (`--set optim.lr=3e-4`, "
             "`--set data.subset=null`).", "",
             "| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{key}` | {cell(tp)} | `{default}` | {cell(help_text)} |" for key, tp, default, help_text in describe()]
    return "\n".join(lines) + "\n"
