"""What a policy did: calls, computed and reused per site kind, per branch, per generation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SiteCounts:
    computed: int = 0
    reused: int = 0

    def count(self, computed: bool) -> None:
        if computed:
            self.computed += 1
        else:
            self.reused += 1


@dataclass
class BranchStats:
    """One CFG branch of one generation."""

    calls: int = 0
    #: Site kind ("span", "attention:spatial", ...) to its counts.
    sites: dict[str, SiteCounts] = field(default_factory=dict)
    #: The span decision of each call in order: True computed, False reused.
    span_schedule: list[bool] = field(default_factory=list)
    #: Per call, how many attention/MLP module sites computed (for module-level policies).
    module_schedule: list[int] = field(default_factory=list)
    #: Bytes of tensors the estimator keeps for this branch (residuals, outputs, their history):
    #: now, and the most at any point of the generation.
    kept_bytes: int = 0
    peak_kept_bytes: int = 0

    def count(self, site: str, computed: bool) -> None:
        self.sites.setdefault(site, SiteCounts()).count(computed)

    def keep(self, change: int) -> None:
        self.kept_bytes += change
        self.peak_kept_bytes = max(self.peak_kept_bytes, self.kept_bytes)


@dataclass
class GenerationStats:
    num_steps: int | None
    branches: dict[int, BranchStats] = field(default_factory=dict)

    def branch(self, index: int) -> BranchStats:
        return self.branches.setdefault(index, BranchStats())


@dataclass
class CacheStats:
    """Everything counted since the policy was applied; `last` is the latest generation."""

    strategy: str
    adapter: str
    generations: list[GenerationStats] = field(default_factory=list)
    #: Facts about the attached policy worth reporting (e.g. a preset it picked).
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def last(self) -> GenerationStats:
        if not self.generations:
            raise LookupError("no generation has run under this policy yet")
        return self.generations[-1]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
