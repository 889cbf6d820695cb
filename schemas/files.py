"""Reading the TOML and JSON files that configs, presets and specs come in."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

SUFFIXES = (".toml", ".json")


def parse_table(text: str, suffix: str) -> dict[str, Any]:
    """The top-level table of TOML (`suffix` ".toml") or JSON text."""
    data = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("the top level must be a table (a JSON object)")
    return data


def read_table(path: Path) -> dict[str, Any]:
    """The top-level table of a .toml or .json file."""
    return parse_table(path.read_text(), path.suffix)
