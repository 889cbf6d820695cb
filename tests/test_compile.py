"""torch.compile on the transformer's blocks: after the first generation, none recompiles."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import cachekit
from cachekit import testbed
from cachekit.schemas import PABConfig, TeaCacheConfig, UniformConfig

CONFIGS = {
    "uniform": UniformConfig(interval=2),
    "teacache": TeaCacheConfig(coefficients=[1.0, 0.0], rel_l1_thresh=0.05),
    "pab": PABConfig(),
}


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
