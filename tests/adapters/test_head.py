"""Where the cached residual ends: cachekit re-runs the model's output head (norm and modulation)
with the current step's embedding on a reused call; the published Mochi and LTX TeaCache scripts
put the head inside the cached residual instead. On the same schedule, cachekit's is the closer
to the uncached output (the README quotes these figures)."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

import cachekit
from cachekit.registry import registry
from cachekit.schemas import UniformConfig

STEPS = 8


def generate(example, head_in_residual: bool = False) -> torch.Tensor:
    """A CFG loop under uniform(2) (computed steps 0, 2, 4, 6, 7); with `head_in_residual`, the
    head's output is cached with the blocks' residual and re-applied as the published scripts do."""
    model = example.model
    stored: dict[int, torch.Tensor] = {}
    call = {"index": 0, "entered": None}
    computes = {0, 2, 4, 6, 7}

    def enter(_, args, kwargs):
        call["entered"] = kwargs.get("hidden_states", args[0] if args else None)

    def head(_, args):
        step, branch = divmod(call["index"], 2)
        call["index"] += 1
        if step in computes:
            stored[branch] = args[0] - call["entered"]
            return None
        return (call["entered"] + stored[branch],)

    hooks = []
    if head_in_residual:
        hooks = [
            model.transformer_blocks[0].register_forward_pre_hook(enter, with_kwargs=True),
            model.proj_out.register_forward_pre_hook(head),
        ]
    try:
        with cachekit.apply(model, UniformConfig(interval=2, num_inference_steps=STEPS)):
            return example.denoise(STEPS)
    finally:
        for hook in hooks:
            hook.remove()


def psnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR over the reference's range, for latents of any layout (torchmetrics does the maths)."""
    value = peak_signal_noise_ratio(output, reference, data_range=(reference.max() - reference.min()).item())
    return float(value)


def uncached(example) -> torch.Tensor:
    return example.denoise(STEPS)


#: Re-running the head, and the head inside the residual, in dB against the uncached output.
DOCUMENTED = {"mochi": (54.71, 54.39), "ltx": (60.25, 44.68)}


@pytest.mark.parametrize("family", ["mochi", "ltx"])
def test_rerunning_the_head_is_closer_than_caching_it(family):
    example = registry().adapters[family].example()
    reference = uncached(example)
    ours = psnr(generate(example), reference)
    published = psnr(generate(example, head_in_residual=True), reference)
    assert ours > published
    # the figures docs/strategies.md gives
    assert (ours, published) == pytest.approx(DOCUMENTED[family], abs=0.05)
