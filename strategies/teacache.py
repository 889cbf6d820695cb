"""TeaCache (arXiv 2411.19108): skip the block stack while the timestep-modulated input has
changed little since the last computed step.

Per call and per CFG branch: d = mean|probe - previous| / mean|previous|; the accumulator grows
by poly(d) (the rescale polynomial); the span is computed when the accumulator reaches the
threshold, which resets it. The warm-up (the first `warmup_steps`, or the first `warmup_share` of
the steps) and, unless the preset or config says otherwise, the last step always compute and
reset it; the previous probe is updated at every call, computed or not. The probe is what the
preset was fitted on: the modulated input, the timestep embedding, or its projection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cachekit.adapter import PROBE, PROJECTED_TIMESTEP_EMBEDDING, TIMESTEP_EMBEDDING, Adapter, Place
from cachekit.hookspecs import hookimpl
from cachekit.schemas.teacache import TeaCacheConfig, TeaCachePreset, load_preset, presets_for, teacache_presets
from cachekit.signals import relative_l1
from cachekit.strategy import ExampleConfigs, Knob, Signals, Step, Strategy

#: The signal each probe kind is read from.
_SIGNALS = {
    "modulated_input": PROBE,
    "timestep_embedding": TIMESTEP_EMBEDDING,
    "projected_timestep_embedding": PROJECTED_TIMESTEP_EMBEDDING,
}


@dataclass
class _BranchState:
    previous: torch.Tensor | None = None
    accumulated: float = 0.0


class TeaStrategy(Strategy[TeaCacheConfig]):
    config_class = TeaCacheConfig
    knob = Knob("rel_l1_thresh")
    rank_consistent = True  # decides from the step and cachekit.signals alone

    def __init__(self, config: TeaCacheConfig) -> None:
        super().__init__(config)
        self.picked_note: str | None = None
        preset = load_preset(config.preset) if config.preset is not None else None
        self._settle(preset)

    def _settle(self, preset: TeaCachePreset | None) -> None:
        """Fill what the config left unset from `preset` (or the built-in defaults)."""
        config = self.config
        self.preset = preset
        self.coefficients = config.coefficients or (preset.coefficients if preset else None)
        self.probe = config.probe or (preset.probe if preset else "modulated_input")
        if config.warmup_steps is not None or config.warmup_share is not None:
            self.warmup_steps, self.warmup_share = config.warmup_steps or 0, config.warmup_share
        else:
            self.warmup_steps = preset.warmup_steps if preset and preset.warmup_share is None else 1
            self.warmup_share = preset.warmup_share if preset else None
        last = config.compute_last_step
        self.compute_last_step = last if last is not None else (preset.compute_last_step if preset else True)
        self.needs_num_steps = self.compute_last_step or self.warmup_share is not None
        self.threshold = config.rel_l1_thresh
        if self.threshold is None and preset is not None and preset.thresholds:
            self.threshold = preset.thresholds[0]

    @classmethod
    def example_configs(cls) -> ExampleConfigs:
        # Unit coefficients fit any model; a warm-up over every step never reuses.
        return ExampleConfigs(
            never_reuses=TeaCacheConfig(rel_l1_thresh=0.1, coefficients=(1.0, 0.0), warmup_steps=1000),
            reuses=TeaCacheConfig(rel_l1_thresh=1000.0, coefficients=(1.0, 0.0)),
        )

    def required_points(self) -> frozenset[str]:
        return frozenset({Place.SPAN, _SIGNALS[self.probe]})

    def attach(self, adapter: Adapter) -> dict[str, Any]:
        if self.coefficients is None:
            self._settle(self._pick_preset(adapter))
        model = type(adapter.model).__name__
        if self.preset is not None:
            self.preset.check_model("TeaCache", adapter.name, adapter.identity(), model, self.config.allow_other_model)
        identity = self.preset.identity if self.preset is not None else None
        if self.threshold is None:
            tune = " or find one with `cachekit tune <spec> --strategy ... --ratio 0.4 --write`" if identity else ""
            raise ValueError(
                f"TeaCache preset {self.preset.name if self.preset else None!r} suggests no threshold: "
                f"set rel_l1_thresh{tune}"
            )
        info = {
            "preset": self.preset.name if self.preset else None,
            "coefficients": list(self.coefficients or ()),
            "rel_l1_thresh": self.threshold,
            "probe": self.probe,
            "warmup_steps": self.warmup_steps,
            "warmup_share": self.warmup_share,
            "compute_last_step": self.compute_last_step,
        }
        if self.picked_note:
            info["preset_note"] = self.picked_note
        return info

    def _pick_preset(self, adapter: Adapter) -> TeaCachePreset:
        config = dict(getattr(adapter.model, "config", {}))
        fitting = presets_for(adapter.name, config)
        if len(fitting) == 1:
            picked = fitting[0]
            if picked.shared_with:
                self.picked_note = (
                    f"picked {picked.name!r} from the model's config, which {picked.shared_with} share; no set is "
                    "published for those: give preset= to choose deliberately"
                )
            return picked
        model = type(adapter.model).__name__
        if fitting:
            raise ValueError(
                f"several TeaCache presets fit {model}, whose configs are alike: {', '.join(p.name for p in fitting)}; "
                "choose one with TeaCacheConfig(preset=...)"
            )
        raise ValueError(
            f"no TeaCache preset fits {model} (adapter {adapter.name!r}); known presets: "
            f"{', '.join(teacache_presets())}. Give coefficients= or preset=, or calibrate coefficients "
            "for this model (fit the output's relative L1 change against the probe's over uncached runs)"
        )

    def new_state(self) -> _BranchState:
        return _BranchState()

    def warming_up(self, step: Step) -> bool:
        if self.warmup_share is not None:
            assert step.num_steps is not None
            return step.index < self.warmup_share * step.num_steps
        return step.index < self.warmup_steps

    def decide_span(self, step: Step, signals: Signals, state: _BranchState) -> bool:
        probe = signals[_SIGNALS[self.probe]]
        assert probe is not None and self.coefficients is not None and self.threshold is not None
        previous, state.previous = state.previous, probe
        forced = self.warming_up(step) or (self.compute_last_step and step.is_last)
        if forced or previous is None:
            state.accumulated = 0.0
            return True
        change = relative_l1(probe, previous)
        state.accumulated += _horner(self.coefficients, change)
        if state.accumulated < self.threshold:
            return False
        state.accumulated = 0.0
        return True


def _horner(coefficients: tuple[float, ...], x: float) -> float:
    """The polynomial at x, highest power first, without building a polynomial object."""
    value = 0.0
    for coefficient in coefficients:
        value = value * x + coefficient
    return value


@hookimpl
def cachekit_register_strategies(register: Callable[[type[Strategy[Any]]], None]) -> None:
    register(TeaStrategy)
