"""MagCache (arXiv 2506.09045): the ratio of the block stack's residual magnitude between
consecutive steps follows a curve that depends on the model, not the prompt, so a curve measured
once decides which steps to skip.

Per CFG branch, from step i = round(retention_ratio * N) on: rho *= ratio_i, n += 1,
E += |1 - rho|; the span is skipped while E <= threshold and n <= max_skip_steps (and something
was computed before); otherwise it computes and rho, n, E start over. Earlier steps compute and
leave the accumulators alone. This is the rule diffusers' MagCacheConfig implements.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cachekit.adapter import Adapter, Place
from cachekit.hookspecs import hookimpl
from cachekit.schemas.magcache import (
    MAGCACHE_PRESETS,
    MagCacheConfig,
    MagCachePreset,
    load_magcache_preset,
    magcache_presets,
)
from cachekit.strategy import ExampleConfigs, Knob, Signals, Step, Strategy


@dataclass
class _BranchState:
    ratio: float = 1.0  # rho: the product of ratios since the last compute
    skipped: int = 0  # n
    error: float = 0.0  # E
    computed: bool = False


def resample(ratios: tuple[float, ...], steps: int) -> tuple[float, ...]:
    """`ratios` at `steps` steps by nearest index, rounding half to even (as the published code)."""
    if steps == 1:
        return ratios[-1:]
    scale = (len(ratios) - 1) / (steps - 1)
    return tuple(ratios[round(index * scale)] for index in range(steps))


class MagStrategy(Strategy[MagCacheConfig]):
    config_class = MagCacheConfig
    knob = Knob("threshold")
    rank_consistent = True  # decides from the step and cachekit.signals alone
    requires = frozenset({Place.SPAN})
    needs_num_steps = True

    def __init__(self, config: MagCacheConfig) -> None:
        super().__init__(config)
        self.preset = load_magcache_preset(config.preset) if config.preset is not None else None
        self.ratios: tuple[float, ...] = config.mag_ratios or (self.preset.mag_ratios if self.preset else ())
        self._resampled: dict[int, tuple[float, ...]] = {}

    @classmethod
    def example_configs(cls) -> ExampleConfigs:
        return ExampleConfigs(
            never_reuses=MagCacheConfig(mag_ratios=(1.0, 1.0), max_skip_steps=0, interpolate=True),
            reuses=MagCacheConfig(mag_ratios=(1.0, 1.0), retention_ratio=0.0, interpolate=True),
        )

    def attach(self, adapter: Adapter) -> dict[str, Any]:
        if not self.ratios:
            self.preset = self._pick_preset(adapter)
            self.ratios = self.preset.mag_ratios
        if self.preset is not None:
            self.preset.check_model("MagCache", adapter.name, adapter.identity(), type(adapter.model).__name__)
        if self.config.num_inference_steps is not None:
            self.ratios_for(self.config.num_inference_steps)  # a bare transformer: check the count now
        return {"preset": self.preset.name if self.preset else None, "ratios": len(self.ratios)}

    @staticmethod
    def _pick_preset(adapter: Adapter) -> MagCachePreset:
        config = dict(getattr(adapter.model, "config", {}))
        fitting = MAGCACHE_PRESETS.fitting(adapter.name, config)
        if len(fitting) != 1:
            raise ValueError(
                f"no MagCache ratio set is known for this {type(adapter.model).__name__} ({adapter.name!r}); shipped "
                f"sets: {', '.join(magcache_presets())}. Measure its ratios with `cachekit calibrate` and give "
                "preset= (the file) or mag_ratios="
            )
        return fitting[0]

    def ratios_for(self, steps: int) -> tuple[float, ...]:
        """The ratios for a generation of `steps` steps: as given, or resampled if allowed."""
        if steps not in self._resampled:
            if len(self.ratios) == steps:
                self._resampled[steps] = self.ratios
            elif self.config.interpolate:
                self._resampled[steps] = resample(self.ratios, steps)
            else:
                raise ValueError(
                    f"MagCache has {len(self.ratios)} magnitude ratios but the generation has {steps} steps: give "
                    f"one ratio per step (`cachekit calibrate` at {steps} steps), or set interpolate=True to "
                    "resample them by nearest index"
                )
        return self._resampled[steps]

    def new_state(self) -> _BranchState:
        return _BranchState()

    def decide_span(self, step: Step, signals: Signals, state: _BranchState) -> bool:
        assert step.num_steps is not None
        ratios = self.ratios_for(step.num_steps)
        if step.index < int(self.config.retention_ratio * step.num_steps + 0.5):
            state.computed = True
            return True
        state.ratio *= ratios[step.index] if step.index < len(ratios) else 1.0
        state.skipped += 1
        state.error += abs(1.0 - state.ratio)
        if state.computed and state.error <= self.config.threshold and state.skipped <= self.config.max_skip_steps:
            return False
        state.ratio, state.skipped, state.error, state.computed = 1.0, 0, 0.0, True
        return True


@hookimpl
def cachekit_register_strategies(register: Callable[[type[Strategy[Any]]], None]) -> None:
    register(MagStrategy)
