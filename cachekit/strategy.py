"""The Strategy contract: a strategy decides compute or reuse; it never plumbs.

The runtime asks a strategy at each site it declared (`requires`) and hands it the step, the
signals it asked for, and a state object that belongs to one CFG branch of one generation. A
strategy never sees another branch's state, so cross-branch leaks cannot happen by construction.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, NamedTuple, TypeVar

import torch

from cachekit.adapter import Adapter, ModuleSite
from cachekit.schemas.configs import StrategyConfig

ConfigT = TypeVar("ConfigT", bound=StrategyConfig)


@dataclass(frozen=True)
class Step:
    """Where a transformer call sits in the generation."""

    index: int  # the step, from 0
    num_steps: int | None  # steps in the generation, when known
    timestep: float
    branch: int  # 0 for the first call at this timestep, 1 for the next (CFG as separate calls)
    #: The branch level produces this call's CFG partner from it at this step (the second call of a
    #: two-call step is not run; a batched call runs on its conditional half only).
    alone: bool = False
    #: The trajectory, for estimators that ask for it (`Estimator.trajectory`): the step's noise level
    #: and the next step's (from the pipeline's flow-matching scheduler), and the call's noisy latent
    #: laid out (batch, channels, frames, height, width).
    sigma: float | None = None
    next_sigma: float | None = None
    latent: torch.Tensor | None = None

    @property
    def is_last(self) -> bool:
        return self.num_steps is not None and self.index == self.num_steps - 1


class Signals(Mapping[str, Any]):
    """The values a decision is made from, by the name the adapter exposes each under (`probe`,
    `timestep_embedding`, `latent`, ... or a signal of its own), and, where the strategy keeps
    blocks computed at the head of the span, `head_residual`: their residual (output - input) on
    the first stream, one tensor per run of blocks between which the model leaves the tokens alone.
    Only the signals the strategy requires are set; `signals.probe` reads `signals["probe"]` (None
    where it is not set)."""

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self._values = dict(values or {})

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._values.get(name)

    def __repr__(self) -> str:
        return f"Signals({', '.join(self._values)})"


@dataclass(frozen=True)
class Knob:
    """The config field that trades compute for quality, which tuning searches: an integer
    interval (tried 1, 2, ... up to the step count), a threshold (bisected on a log scale
    between `low` and `high`), or a per-step mask (found for a budget by `cachekit.schedule`).
    `reuses_more`: the direction in which the strategy skips more."""

    field: str
    integer: bool = False
    reuses_more: Literal["higher", "lower"] = "higher"
    low: float = 1e-4
    high: float = 10.0
    mask: bool = False

    def show(self, value: float | str) -> str:
        """`value` as messages quote it: `field=value`."""
        return f"{self.field}={value}" if isinstance(value, str) else f"{self.field}={value:.5g}"


class ExampleConfigs(NamedTuple):
    """What the conformance tests run a strategy with, on every registered adapter."""

    never_reuses: StrategyConfig  # output must equal the bare model's, bitwise
    reuses: StrategyConfig  # reuses within a few steps on any model, random weights included


class Strategy(Generic[ConfigT]):
    """Base class of every strategy.

    Subclasses set `config_class` and `requires` (or override `required_points` where the config
    decides), and implement the decision for each site they require: `decide_span` for the span,
    `decide_module` for attention and MLP sites. `new_state` gives the per-branch state; the
    runtime keeps one per branch and drops them all when a generation starts.
    """

    config_class: ClassVar[type[StrategyConfig]]
    #: The field tuning searches (None: nothing to tune).
    knob: ClassVar[Knob | None] = None
    #: The places it decides (`Place.SPAN`, `Place.ATTENTION`, `Place.MLP`) and the signals it
    #: decides from, by name (`"probe"`, `"latent"`, `"output"`, ...: what the adapter exposes).
    requires: ClassVar[frozenset[str]] = frozenset()
    #: True when every decision depends only on the step and on signals computed with
    #: `cachekit.signals` (which agree on every rank); otherwise, under context parallelism, the
    #: ranks' decisions are compared at every call and a disagreement is an error.
    rank_consistent: ClassVar[bool] = False
    #: True when the decision depends on knowing the generation's last step.
    needs_num_steps: bool = False
    #: True when it reuses only on calls that run alone (`Step.alone`): under the branch level, the
    #: values of the branch it produces are then not kept at all.
    reuses_alone_only: ClassVar[bool] = False

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    @classmethod
    def name(cls) -> str:
        return cls.config_class.registered_name()

    @classmethod
    def example_configs(cls) -> ExampleConfigs | None:
        """Configs for the conformance tests; None leaves the strategy out of them."""
        return None

    def required_points(self) -> frozenset[str]:
        """The points this strategy needs from the model's adapter (and the signals it is handed)."""
        return self.requires

    def attach(self, adapter: Adapter) -> dict[str, Any]:
        """Called once when applied. May read the adapter's identity (never the model's tensors)
        to settle defaults; returns facts worth reporting in `handle.stats.info`."""
        return {}

    def may_reuse(self, site: ModuleSite) -> bool:
        """Whether `site`'s output may ever be skipped; outputs that never are are not kept."""
        return True

    def new_state(self) -> Any:
        """State for one branch of one generation."""
        return None

    def decide_span(self, step: Step, signals: Signals, state: Any) -> bool:
        """True: run the residual span; False: produce its residual with the estimator."""
        raise NotImplementedError(f"{type(self).__name__} requires the span but does not decide it")

    def decide_module(self, step: Step, site: ModuleSite, state: Any) -> bool:
        """True: run the attention or MLP module at `site` (and every site of its `decision_key`
        in this call); False: produce their outputs with the estimator."""
        raise NotImplementedError(f"{type(self).__name__} requires module sites but does not decide them")

    def decision_key(self, site: ModuleSite) -> Hashable:
        """Sites with the same key get one decision per call, asked at the first of them (the
        default: one per site). A strategy whose decision is the same for every site of a kind
        returns the kind, so a call costs one decision per kind, not one per module."""
        return site.name

    def reuses_gated(self, site: ModuleSite) -> bool:
        """Whether a skipped gated site (`site.gated`) gets the value its block added last time
        (gate x output, as VideoSys's PAB reuses it) instead of last time's output gated anew by
        the current step's gate."""
        return False

    def always_computed(self) -> tuple[int, int]:
        """(first, last): how many blocks at the start and at the end of the span run on every
        call; `decide_span` then decides the blocks between, and the first blocks' residual is
        handed to it as `signals.head_residual` (the DBCache shape)."""
        return (0, 0)

    def observe(self, step: Step, output: torch.Tensor, state: Any) -> None:
        """After each transformer call, its prediction; called for strategies requiring "output"."""
