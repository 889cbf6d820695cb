"""The branch level: with classifier-free guidance, the second CFG branch of a step is produced from
the first instead of computed, on the steps this config says.

    TeaCacheConfig(rel_l1_thresh=0.2, branches={"interval": 3})
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, ConfigDict, Field, SerializeAsAny, model_validator

from cachekit.schemas.checked import Checked
from cachekit.schemas.estimators import CopyConfig, EstimatorConfig, parse_estimator

__all__ = ["BranchLevelConfig"]


class BranchLevelConfig(Checked):
    """Compute the second CFG branch on the first `warmup` steps, every `interval`-th step, and every
    step whose timestep lies outside `window`; on the other steps its output is the first branch's
    output of the same step plus the `estimator`'s value of the difference between the branches
    (second minus first), recorded on the steps both were computed.

    The second branch is the pipeline's second call of a step (`cfg="calls"`: diffusers' two-call
    pipelines call the conditional branch first), or the first half of one batched call
    (`cfg="batched"`: diffusers' batched pipelines put the unconditional half first); a batched
    call whose second branch is skipped runs on the other half of the batch only."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    interval: int = Field(default=5, ge=1, le=1000, description="Compute the second branch every N-th step.")
    warmup: int = Field(default=1, ge=1, description="Steps at the start on which both branches are computed.")
    window: tuple[float, float] | None = Field(
        default=None,
        description="(low, high): skip only where low < timestep < high (the 0-1000 scale); None: on every step.",
    )
    cfg: Literal["calls", "batched"] = Field(
        default="calls",
        description='How the pipeline runs CFG: "calls" (one transformer call per branch, the second one skipped) '
        'or "batched" (one call, unconditional half first; a skip runs the conditional half only).',
    )
    estimator: Annotated[SerializeAsAny[EstimatorConfig], BeforeValidator(parse_estimator)] = Field(
        default=CopyConfig(),
        description='How the difference between the branches is carried to a skipped step: "copy" (the last '
        'one), "fastercache" (its low and high frequencies weighted apart), or any other estimator kind.',
    )

    @model_validator(mode="after")
    def _ordered_window(self) -> BranchLevelConfig:
        if self.window is not None and not self.window[0] < self.window[1]:
            raise ValueError(f"window must be (low, high) with low < high, got {self.window}")
        return self
