"""What a study generates with: a testbed model or a diffusers pipeline, behind one interface.

Both generate from (seed, condition) with the initial noise fixed by the seed, so every policy
of a study starts from the same latents.
"""

from __future__ import annotations

from typing import Any

import torch

from cachekit.schemas.study import Generation


class StudyModel:
    """A model under study: `target` is what `cachekit.apply` takes."""

    def __init__(self, name: str, target: Any, spec: Generation) -> None:
        self.name = name
        self.target = target
        self.spec = spec

    @property
    def transformer(self) -> torch.nn.Module:
        return self.target.transformer

    def generate(self, seed: int, condition: str, steps: int | None = None) -> torch.Tensor:
        """One generation from the seed's initial noise (`steps`: the spec's unless given)."""
        raise NotImplementedError


class TestbedModel(StudyModel):
    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, name: str, spec: Generation, trained: bool = True) -> None:
        from cachekit import testbed

        pipe = testbed.load(name, trained=trained).to(spec.device, getattr(torch, spec.dtype))
        super().__init__(name, pipe, spec)
        self._latents: dict[int, torch.Tensor] = {}

    def generate(self, seed: int, condition: str, steps: int | None = None) -> torch.Tensor:
        if seed not in self._latents:  # made once per seed, shared by every policy
            self._latents[seed] = self.target.prepare_latents(seed)
        options = {} if self.spec.guidance_scale is None else {"guidance_scale": self.spec.guidance_scale}
        return self.target(
            [int(condition)], latents=self._latents[seed], num_inference_steps=steps or self.spec.steps, **options
        )


class DiffusersModel(StudyModel):
    """A diffusers pipeline from a hub id or a local folder; outputs scaled to [-1, 1]."""

    def __init__(self, name: str, spec: Generation) -> None:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(name, torch_dtype=getattr(torch, spec.dtype)).to(spec.device)
        pipe.set_progress_bar_config(disable=True)
        super().__init__(name, pipe, spec)

    def generate(self, seed: int, condition: str, steps: int | None = None) -> torch.Tensor:
        spec = self.spec
        options: dict[str, Any] = {
            key: value
            for key, value in {
                "guidance_scale": spec.guidance_scale,
                "height": spec.height,
                "width": spec.width,
                "num_frames": spec.frames,
            }.items()
            if value is not None
        }
        result = self.target(
            condition,
            num_inference_steps=steps or spec.steps,
            generator=torch.Generator(spec.device).manual_seed(seed),
            output_type="pt",
            **options,
        )
        output = result.frames if hasattr(result, "frames") else result.images
        if output.ndim == 5:  # video pipelines return (B, F, C, H, W)
            output = output.transpose(1, 2)
        return output.float() * 2 - 1


def load_model(name: str, spec: Generation) -> StudyModel:
    from cachekit import testbed

    return TestbedModel(name, spec) if name in testbed.names() else DiffusersModel(name, spec)
