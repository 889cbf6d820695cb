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
    """The top-level table of a .toml or .json file; a file that does not parse is named."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"{path}: cannot read it: {error.strerror or error}") from None
    try:
        return parse_table(text, path.suffix)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as error:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise ValueError(f"{path}: not a valid {kind} table: {error}") from None
