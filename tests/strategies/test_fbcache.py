"""First-Block Cache and DBCache: the first and last blocks always run, the rest is decided from
the first blocks' residual."""

from __future__ import annotations

import pytest
import torch
from helpers import RunCounter, flux_inputs

import cachekit
from cachekit.schemas import FBCacheConfig
from cachekit.signals import relative_l1
from cachekit.testing import tiny_flux_transformer


def blocks_of(model):
    return [*model.transformer_blocks, *model.single_transformer_blocks]


def test_dbcache_runs_its_first_and_last_blocks_always_and_decides_from_the_first_blocks_residual():
    """Fn = 2, Bn = 1 on a 5-block Flux: blocks 0, 1 and 4 run at every call; blocks 2 and 3 when the
    first two blocks' residual (image tokens, measured here with plain hooks) changed by more than
    the threshold since the last computed call."""
    model = tiny_flux_transformer(num_layers=2, num_single_layers=3)
    blocks = blocks_of(model)
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        blocks[0].register_forward_pre_hook(
            lambda _, a, k: seen.__setitem__("in", k["hidden_states"]), with_kwargs=True
        ),
        blocks[1].register_forward_hook(lambda _, a, k, out: seen.__setitem__("out", out[1]), with_kwargs=True),
    ]
    counter = RunCounter(blocks, {block: [block.attn] for block in blocks})
    threshold = 0.2
    config = FBCacheConfig(threshold=threshold, first_blocks=2, last_blocks=1)
    expected, reference = [], None
    try:
        with cachekit.apply(model, config) as handle:
            for index in range(10):
                model(**flux_inputs(timestep=1 - index / 10))
                residual = seen["out"] - seen["in"]
                compute = reference is None or relative_l1(residual, reference) > threshold
                reference = residual if compute else reference
                expected.append(compute)
    finally:
        counter.close()
        for hook in hooks:
            hook.remove()
    schedule = handle.stats.last.branches[0].span_schedule
    assert schedule == expected and 0 < sum(schedule) < 10
    assert counter.counts == [10, 10, sum(schedule), sum(schedule), 10]


def test_dbcache_caps_skips_in_a_row_and_warms_up():
    model = tiny_flux_transformer()
    config = FBCacheConfig(threshold=1000.0, warmup_steps=2, max_consecutive_cached=2, max_cached_steps=3)
    with cachekit.apply(model, config) as handle:
        for index in range(12):
            model(**flux_inputs(timestep=1 - index / 12))
    assert handle.stats.last.branches[0].span_schedule == [True, True, False, False, True, False, *[True] * 6]


def test_first_and_last_blocks_must_leave_something_to_skip():
    model = tiny_flux_transformer()  # 3 blocks
    with pytest.raises(
        ValueError, match=r"keeps 2 blocks at the head and 1 at the tail .* has 3 blocks.*first \+ last < 3"
    ):
        cachekit.apply(model, FBCacheConfig(first_blocks=2, last_blocks=1, num_inference_steps=4))
    assert not hasattr(model, "_diffusers_hook") or not model._diffusers_hook.hooks  # nothing left behind
