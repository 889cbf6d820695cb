"""torch.compile on the transformer's blocks: after the first generation, none recompiles."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import cachekit
from cachekit import testbed
from cachekit.schemas import (
    EasyCacheConfig,
    FBCacheConfig,
    MagCacheConfig,
    PABConfig,
    StrategyConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
    UniformConfig,
)

TAYLOR = {"kind": "taylor", "order": 2}
#: Where a strategy's reusing example would not exercise what compiling must survive; every other
#: installed strategy runs its reusing example.
SHARPER = {
    "teacache": TeaCacheConfig(coefficients=[1.0, 0.0], rel_l1_thresh=0.05),
    "fbcache": FBCacheConfig(threshold=0.1, first_blocks=2, last_blocks=1),
    "magcache": MagCacheConfig(interpolate=True, threshold=0.2),
    "taylorseer": TaylorSeerConfig(interval=3, level="modules"),
    "easycache": EasyCacheConfig(warmup_steps=4),
}
EXTRA = {
    "teacache+taylor": TeaCacheConfig(coefficients=[1.0, 0.0], rel_l1_thresh=0.1, estimator=TAYLOR),
    "pab+foca": PABConfig(estimator="foca"),
}


def compiled_configs() -> dict[str, StrategyConfig]:
    """Every installed strategy (from the registry), and a forecast on a span and a module level."""
    configs = {}
    for name in cachekit.list_strategies():
        examples = cachekit.get_strategy(name).example_configs()
        if name in SHARPER or examples is not None:
            configs[name] = SHARPER.get(name) or examples.reuses
    return {**configs, **EXTRA}


CONFIGS = compiled_configs()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_second_generation_triggers_no_recompile_and_matches_eager(name):
    pipe = testbed.load("flux-digits")
    with cachekit.apply(pipe, CONFIGS[name]):
        eager = pipe([3], num_inference_steps=20)
    for block in [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]:
        block.compile()
    torch._dynamo.reset()
    with cachekit.apply(pipe, CONFIGS[name]) as handle:
        pipe([3], num_inference_steps=20)
        counters.clear()
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = pipe([3], num_inference_steps=20)
    assert not counters["stats"] and not counters["graph_break"]  # nothing traced again
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    assert handle.stats.generations[0] == handle.stats.generations[1]  # the same decisions


@pytest.mark.slow
def test_a_compiled_transformer_is_unwrapped_and_runs_under_a_strategy():
    """torch.compile(model) returns a wrapper: cachekit hooks the model it wraps."""

    from helpers import flux_inputs

    from cachekit.testing import tiny_flux_transformer

    model = tiny_flux_transformer()
    reference = [model(**flux_inputs(timestep=1 - i / 4))[0] for i in range(4)]
    compiled = torch.compile(model)
    with cachekit.apply(compiled, UniformConfig(interval=2, num_inference_steps=4)) as handle:
        outputs = [compiled(**flux_inputs(timestep=1 - i / 4))[0] for i in range(4)]
    assert handle.stats.last.branches[0].span_schedule == [True, False, True, True]
    torch.testing.assert_close(outputs[0], reference[0], atol=1e-5, rtol=0)
    assert not torch.allclose(outputs[1], reference[1])  # step 1 re-applied step 0's residual
