"""What a strategy did: calls, computed and reused per site kind, per branch, per generation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


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
    #: Calls the branch level produced from the other CFG branch, running no block.
    produced: int = 0
    #: Site kind ("span", "attention:spatial", ...) to its counts.
    sites: dict[str, SiteCounts] = field(default_factory=dict)
    #: The span decision of each call in order: True computed, False reused.
    span_schedule: list[bool] = field(default_factory=list)
    #: Per call, how many attention/MLP module sites computed (for module-level strategies).
    module_schedule: list[int] = field(default_factory=list)
    #: Bytes of tensors the estimator keeps for this branch (residuals, outputs, their history):
    #: now, and the most at any point of the generation.
    kept_bytes: int = 0
    peak_kept_bytes: int = 0
    #: Bytes of tensors the strategy's own state holds (TeaCache's previous probe, FBCache's reference).
    strategy_bytes: int = 0
    #: The name of the pipeline's cache context for this branch ("cond", "uncond"), when it gives one.
    context: str | None = None

    def count(self, site: str, computed: bool) -> None:
        self.sites.setdefault(site, SiteCounts()).count(computed)

    def mark(self) -> tuple[Any, ...]:
        """What the counts are now, for `rewind` after a call that raised."""
        sites = {site: (c.computed, c.reused) for site, c in self.sites.items()}
        return self.calls, self.produced, sites, len(self.span_schedule), len(self.module_schedule)

    def rewind(self, mark: tuple[Any, ...]) -> None:
        """Back to `mark`: a call that raised counts for nothing (its branch's kept values are dropped)."""
        self.calls, self.produced, sites, spans, modules = mark
        self.sites = {site: SiteCounts(*counts) for site, counts in sites.items()}
        del self.span_schedule[spans:], self.module_schedule[modules:]
        self.kept_bytes = 0

    def keep(self, change: int) -> None:
        self.kept_bytes += change
        self.peak_kept_bytes = max(self.peak_kept_bytes, self.kept_bytes)

    def __str__(self) -> str:
        counts = ", ".join(f"{site} {c.computed} computed / {c.reused} reused" for site, c in self.sites.items())
        lines = [f"{self.calls} calls", counts or "nothing reusable"]
        if self.produced:
            lines.insert(1, f"{self.produced} produced from the other branch")
        if self.span_schedule:
            lines.append("schedule " + "".join("C" if computed else "." for computed in self.span_schedule))
        if self.module_schedule:
            lines.append("modules computed per call " + " ".join(str(count) for count in self.module_schedule))
        if self.peak_kept_bytes:
            lines.append(f"kept at most {readable_bytes(self.peak_kept_bytes)}")
        if self.strategy_bytes:
            lines.append(f"strategy state {readable_bytes(self.strategy_bytes)}")
        return ", ".join(lines)


@dataclass
class GenerationStats:
    num_steps: int | None
    branches: dict[int, BranchStats] = field(default_factory=dict)
    #: Bytes the branch level keeps of the difference between the CFG branches (its estimator's state).
    difference_bytes: int = 0

    def branch(self, index: int) -> BranchStats:
        return self.branches.setdefault(index, BranchStats())


@dataclass
class CacheStats:
    """Everything counted since the strategy was applied; `last` is the latest generation."""

    strategy: str
    adapter: str
    generations: list[GenerationStats] = field(default_factory=list)
    #: Facts about the attached strategy worth reporting (e.g. a preset it picked).
    info: dict[str, Any] = field(default_factory=dict)
    #: The strategy config's fields (but the estimator, in `info`), as set or defaulted.
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def last(self) -> GenerationStats:
        if not self.generations:
            raise LookupError("no generation has run under this strategy yet")
        return self.generations[-1]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        """What the strategy did, as the peers print it: per CFG branch of the latest generation the
        computed and reused counts per site and the span's schedule (C computed, . reused), and the
        facts the strategy reported (the preset and threshold it took)."""
        lines = [f"{self.strategy} on {self.adapter}"]
        if self.settings:
            lines.append("  settings: " + ", ".join(f"{key}={value}" for key, value in self.settings.items()))
        lines += [f"  {key}: {value}" for key, value in self.info.items()]
        if not self.generations:
            return "\n".join([*lines, "  no generation yet"])
        last = self.last
        steps = f", {last.num_steps} steps" if last.num_steps is not None else ""
        lines.append(f"  generation {len(self.generations)} of {len(self.generations)}{steps}:")
        if last.difference_bytes:
            lines.append(
                f"    the branch level keeps {readable_bytes(last.difference_bytes)} of the branches' difference"
            )
        for index, branch in last.branches.items():
            lines.append(f"    branch {index}{_branch_role(index, branch, len(last.branches))}: {branch}")
        return "\n".join(lines)


def _branch_role(index: int, branch: BranchStats, branches: int) -> str:
    """Which CFG branch it is: the pipeline's name for it (cond, uncond), else its place in a step."""
    if branch.context:
        return f" ({branch.context})"
    if branches > 1:
        return f" (call {index + 1} of each step)"
    return ""


def readable_bytes(count: int) -> str:
    """`count` bytes in KiB, MiB or GiB, whichever reads best."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count / 2**10:.1f} KiB"


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in `value` (a tensor, or a dataclass, dict, list or tuple holding them),
    each tensor counted once."""
    seen: dict[int, int] = {}
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            seen[id(item)] = item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            stack.extend(vars(item).values())
    return sum(seen.values())
