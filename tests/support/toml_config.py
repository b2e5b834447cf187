"""Config files for the real `backupmx serve` in scenarios and benchmarks: {"server": {...}, "domains":
[{...}], ...} as TOML text. Tables and arrays of tables of plain values only; it does not check that
the text parses (the caller does where it wants to)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_toml(sections: Mapping[str, Any]) -> str:
    """{"server": {...}, "domains": [{...}], ...} -> TOML text (tables and arrays of tables only)."""
    out: list[str] = []
    for name, body in sections.items():
        if isinstance(body, list):
            for item in body:
                out.append(f"[[{name}]]")
                out.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
                out.append("")
        else:
            out.append(f"[{name}]")
            out.extend(f"{k} = {_toml_value(v)}" for k, v in body.items())
            out.append("")
    return "\n".join(out)
