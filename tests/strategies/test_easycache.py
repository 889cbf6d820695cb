"""EasyCache: skips while the output change predicted from the transformation rate stays small."""

from __future__ import annotations

import torch

import cachekit
from cachekit.schemas import EasyCacheConfig
from cachekit.testbed import load


def test_easycache_decides_by_its_rule_replayed_from_the_outside():
    """The latent going in and the prediction coming out of every call, recorded with plain hooks,
    replayed through the published rule, give the schedule the strategy followed."""
    pipe = load("wan-moving-digits")
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    model = pipe.transformer
    hook = model.register_forward_hook(
        lambda _, args, kwargs, out: calls.append((kwargs["hidden_states"], out[0])), with_kwargs=True
    )
    config = EasyCacheConfig(threshold=0.1, warmup_steps=5)
    try:
        with cachekit.apply(pipe, config) as handle:
            pipe([2], seed=1, num_inference_steps=30)
    finally:
        hook.remove()
    expected = []
    for branch in (0, 1):
        own = calls[branch::2]  # CFG as two calls: cond, uncond
        rate = computed = previous = None
        accumulated = 0.0
        for index, (latent, output) in enumerate(own):
            compute = index < 5 or index == len(own) - 1 or rate is None
            if not compute:
                accumulated += rate * (latent - previous).abs().mean().item() / computed[1].abs().mean().item()
                compute = accumulated >= 0.1
            if compute:
                accumulated = 0.0
                if computed is not None:
                    rate = (output - computed[1]).abs().mean().item() / (latent - computed[0]).abs().mean().item()
                computed = (latent, output)
            previous = latent
            expected.append((branch, compute))
    for branch in (0, 1):
        schedule = handle.stats.last.branches[branch].span_schedule
        assert schedule == [compute for b, compute in expected if b == branch]
        assert 0 < sum(schedule) < len(schedule)
