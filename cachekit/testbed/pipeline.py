"""A testbed model ready to generate: the transformer, its class conditioning, a scheduler.

It samples the way real DiT pipelines do (shifted flow matching, CFG as two transformer calls per
step, cond first, or as one batched call, uncond half first) and exposes `transformer` and
`scheduler`, so `cachekit.apply` takes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import nn

from cachekit.testbed.models import CLASSES, NULL_CLASS, ClassConditioning, Spec

SHIFT = 3.0


class TestbedPipeline:
    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, spec: Spec, transformer: nn.Module, conditioning: ClassConditioning) -> None:
        self.spec = spec
        self.transformer = transformer
        self.conditioning = conditioning
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)

    @property
    def name(self) -> str:
        return self.spec.name

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TestbedPipeline:
        for module in (self.transformer, self.conditioning):
            module.to(device)
            if dtype is not None and dtype != next(module.parameters()).dtype:  # diffusers warns on any cast
                module.to(dtype)
        return self

    def prepare_latents(self, seed: int, batch: int = 1) -> torch.Tensor:
        """The initial noise for `batch` samples from `seed` (what a study shares across strategies);
        drawn on the CPU, so a seed gives the same noise on every device."""
        generator = torch.Generator().manual_seed(seed)
        weight = next(self.transformer.parameters())
        return torch.randn((batch, *self.spec.sample_shape), generator=generator).to(weight.device, weight.dtype)

    @torch.no_grad()
    def __call__(
        self,
        labels: int | list[int] | torch.Tensor,
        seed: int = 0,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        batched_cfg: bool = False,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict[str, Any]], dict[str, Any]] | None = None,
    ) -> torch.Tensor:
        """Samples in [-1, 1] for the digit classes `labels`: (B, 1, 16, 16) images or
        (B, 1, frames, 16, 16) videos. `callback_on_step_end`: as diffusers' pipelines call it,
        after each step with {"latents": ...}; the "latents" it returns replace them."""
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.is_floating_point() or not all(0 <= label < CLASSES for label in labels.tolist()):
            raise ValueError(f"labels {labels.tolist()}: the testbed models generate the digits 0 to {CLASSES - 1}")
        labels = labels.to(next(self.transformer.parameters()).device)
        x = self.prepare_latents(seed, len(labels)) if latents is None else latents.clone()
        cond = self.conditioning(labels)
        uncond = self.conditioning(torch.full_like(labels, NULL_CLASS))
        self.scheduler.set_timesteps(num_inference_steps)
        for index, t in enumerate(self.scheduler.timesteps):
            sigma = (t / 1000).expand(len(labels)).to(x.device, x.dtype)
            if guidance_scale == 1.0:
                velocity = self._velocity(x, sigma, cond)
            elif batched_cfg:
                both = tuple(None if c is None else torch.cat([u, c]) for c, u in zip(cond, uncond, strict=True))
                v_uncond, v_cond = self._velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
                velocity = v_uncond + guidance_scale * (v_cond - v_uncond)
            else:
                v_cond = self._velocity(x, sigma, cond)
                v_uncond = self._velocity(x, sigma, uncond)
                velocity = v_uncond + guidance_scale * (v_cond - v_uncond)
            x = self.scheduler.step(velocity, t, x, return_dict=False)[0]
            if callback_on_step_end is not None:
                x = callback_on_step_end(self, index, t, {"latents": x}).get("latents", x)
        return x.clamp(-1, 1)

    def _velocity(self, x: torch.Tensor, sigma: torch.Tensor, condition: tuple) -> torch.Tensor:
        tokens, pooled = condition
        return self.spec.velocity(self.transformer, x, sigma, tokens, pooled)
