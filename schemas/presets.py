"""Presets: what a strategy was fitted or measured on one model (TeaCache's rescale coefficients,
MagCache's magnitude ratios, and the tuned settings that come next), shipped with cachekit or
written to a file by calibration. Every kind is found, matched to a model and checked the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import ConfigDict, Field

from cachekit.schemas.checked import Checked
from cachekit.schemas.files import SUFFIXES, parse_table, read_table


class Preset(Checked):
    """Fields every kind of preset shares: the model it belongs to and how it is picked."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str
    adapter: str = Field(default="", description="The model family (adapter name) it was made on.")
    match: dict[str, Any] = Field(
        default_factory=dict,
        description='Transformer config values that identify the model, for picking it ("none" matches null).',
    )
    auto: bool = Field(default=True, description="Whether the preset may be picked from the model alone.")
    identity: str | None = Field(
        default=None, description="The model a calibrated preset was made on (adapter and config fingerprint)."
    )
    notes: str = ""

    def fits(self, adapter: str, config: Mapping[str, Any]) -> bool:
        """Whether a transformer of family `adapter` with `config` is the model this was made on."""
        return self.adapter == adapter and all(
            config.get(key) == (None if value == "none" else value) for key, value in self.match.items()
        )

    def check_model(self, kind: str, adapter: str, identity: str, model: str, allow_other: bool = False) -> None:
        """Refuse a preset made on another family, or calibrated on another model, unless allowed."""
        if allow_other:
            return
        if self.adapter and self.adapter != adapter:
            raise ValueError(
                f"{kind} preset {self.name!r} was made on a {self.adapter!r} model, not this {model} ({adapter!r}): "
                "choose a preset of this family, calibrate this model, or set allow_other_model=True to use it anyway"
            )
        if self.identity is not None and self.identity != identity:
            raise ValueError(
                f"{kind} preset {self.name!r} was calibrated on {self.identity}, not on this {model} ({identity}): "
                "calibrate this model, or set allow_other_model=True to use it anyway"
            )

    @classmethod
    def from_file(cls, path: Path) -> Preset:
        """The preset a file holds (a calibration writes them)."""
        return cls.model_validate(read_table(path))


P = TypeVar("P", bound=Preset)


class Presets(Generic[P]):
    """One kind of preset: those shipped in a TOML file beside this module, and files."""

    def __init__(self, kind: str, preset: type[P], shipped_file: str) -> None:
        self.kind = kind
        self.preset = preset
        self.shipped_file = shipped_file

    @functools.cached_property
    def _shipped(self) -> dict[str, P]:
        data = parse_table(resources.files(__package__).joinpath(self.shipped_file).read_text(), ".toml")
        return {name: self.preset(name=name, **fields) for name, fields in data.items()}

    def shipped(self) -> dict[str, P]:
        """Every shipped preset by name."""
        return self._shipped

    def load(self, reference: str) -> P:
        """A shipped preset by name, or a preset file (.json/.toml, e.g. written by calibration)."""
        if reference in self._shipped:
            return self._shipped[reference]
        path = Path(reference)
        if path.suffix not in SUFFIXES:
            raise ValueError(
                f"unknown {self.kind} preset {reference!r}: neither one of {', '.join(self._shipped)} nor a preset "
                "file (.json/.toml)"
            )
        if not path.is_file():
            raise ValueError(f"{self.kind} preset file {path.resolve()} does not exist")
        loaded = self.preset.from_file(path)
        assert isinstance(loaded, self.preset)
        return loaded

    def fitting(self, adapter: str, config: Mapping[str, Any]) -> list[P]:
        """The shipped presets that may be picked automatically for a model."""
        return [preset for preset in self._shipped.values() if preset.auto and preset.fits(adapter, config)]
