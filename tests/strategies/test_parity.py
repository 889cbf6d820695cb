"""Each method against its reference implementation in diffusers 0.42.1: the same compute schedule
and the same outputs, on tiny pipelines (with the cache contexts the pipelines set themselves) and
on both trained testbed models (with the contexts cachekit's peer wrapper sets).

The schedule is read from the outside: per transformer call, whether the last block's own layers ran.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, SeaCacheConfig, TaylorSeerCacheConfig
from diffusers.hooks.sea_cache import _apply_sea_filter

import cachekit
from cachekit import testbed
from cachekit.schemas import magcache_presets
from cachekit.strategies.magcache import resample
from cachekit.strategies.seacache import sea_filter
from cachekit.study.diffusers_methods import apply_diffusers_method
from cachekit.testing import run_flux, run_wan, tiny_flux_pipeline, tiny_wan_pipeline

#: diffusers' TaylorSeer hooks modules by name: the attention modules cachekit's attention sites are.
ATTENTION = r"(transformer_blocks|single_transformer_blocks|blocks)\.\d+\.attn[12]?"


def last_block(transformer: torch.nn.Module) -> torch.nn.Module:
    if hasattr(transformer, "single_transformer_blocks"):
        return transformer.single_transformer_blocks[-1]
    return transformer.blocks[-1]


def scheduled(transformer: torch.nn.Module, run, watched: torch.nn.Module | None = None):
    """The output of `run()` and, per transformer call, whether the last block (or `watched`) computed."""
    ran: list[bool] = []
    leaves = [m for m in (watched or last_block(transformer)).modules() if next(m.children(), None) is None]
    hooks = [transformer.register_forward_pre_hook(lambda *_: ran.append(False))]
    hooks += [leaf.register_forward_hook(lambda *_: ran.__setitem__(-1, True)) for leaf in leaves]
    try:
        return run(), ran
    finally:
        for hook in hooks:
            hook.remove()


def first_attention(transformer: torch.nn.Module) -> torch.nn.Module:
    return (
        transformer.transformer_blocks[0].attn
        if hasattr(transformer, "transformer_blocks")
        else transformer.blocks[0].attn1
    )


def assert_same(ours, theirs, reference):
    (output, schedule), (expected, expected_schedule) = ours, theirs
    assert schedule == expected_schedule
    assert 0 < sum(schedule) < len(schedule), "the comparison must include skipped calls"
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)
    assert not torch.equal(output, reference)  # caching changed something


PIPELINES = {"flux": (tiny_flux_pipeline, run_flux), "wan": (tiny_wan_pipeline, run_wan)}
STEPS = 10


@pytest.mark.parametrize("family", sorted(PIPELINES))
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ({"strategy": "fbcache", "threshold": 0.3}, FirstBlockCacheConfig(threshold=0.3)),
        (
            {"strategy": "magcache", "mag_ratios": [1.0, 1.02, 0.99, 0.98], "interpolate": True, "threshold": 0.2},
            MagCacheConfig(mag_ratios=[1.0, 1.02, 0.99, 0.98], num_inference_steps=STEPS, threshold=0.2),
        ),
        (
            {"strategy": "taylorseer", "interval": 3, "warmup_steps": 2, "level": "attention"},
            TaylorSeerCacheConfig(
                cache_interval=3,
                disable_cache_before_step=2,
                taylor_factors_dtype=torch.float32,
                cache_identifiers=[ATTENTION],
            ),
        ),
    ],
    ids=["fbcache", "magcache", "taylorseer"],
)
def test_equals_diffusers_hooks_in_a_diffusers_pipeline(family, ours, theirs):
    """diffusers' hooks enabled the plain way, run with the cache contexts the pipeline sets."""
    build, run = PIPELINES[family]
    pipe = build()
    generate = lambda: run(pipe, steps=STEPS)  # noqa: E731
    # module-level: every block runs, the schedule is the first attention module's
    watched = first_attention(pipe.transformer) if ours["strategy"] == "taylorseer" else None
    reference = generate()
    with cachekit.apply(pipe, ours):
        mine = scheduled(pipe.transformer, generate, watched)
    pipe.transformer.enable_cache(theirs)
    try:
        expected = scheduled(pipe.transformer, generate, watched)
    finally:
        pipe.transformer.disable_cache()
    assert_same(mine, expected, reference)


def test_seacache_equals_diffusers_in_the_wan_pipeline():
    """Where diffusers' SeaCache runs generically: a Wan text-to-video pipeline, which passes the
    step, step count and sigma in its own cache contexts."""
    pipe = tiny_wan_pipeline()
    generate = lambda: run_wan(pipe, steps=STEPS)  # noqa: E731
    reference = generate()
    with cachekit.apply(pipe, {"strategy": "seacache", "threshold": 0.5}):
        mine = scheduled(pipe.transformer, generate)
    pipe.transformer.enable_cache(SeaCacheConfig(threshold=0.5))
    try:
        expected = scheduled(pipe.transformer, generate)
    finally:
        pipe.transformer.disable_cache()
    assert_same(mine, expected, reference)


def methods_on(model: str):
    ratios = list(magcache_presets()[model].mag_ratios)
    return [
        ({"strategy": "fbcache", "threshold": 0.1}, {"strategy": "diffusers.first_block_cache", "threshold": 0.1}),
        (
            {"strategy": "magcache", "preset": model, "threshold": 0.1, "max_skip_steps": 4},
            {
                "strategy": "diffusers.mag_cache",
                "mag_ratios": ratios,
                "num_inference_steps": 50,
                "threshold": 0.1,
                "max_skip_steps": 4,
            },
        ),
        (
            {"strategy": "taylorseer", "level": "attention"},
            {
                "strategy": "diffusers.taylorseer_cache",
                "taylor_factors_dtype": "float32",
                "cache_identifiers": [ATTENTION],
            },
        ),
        ({"strategy": "seacache", "threshold": 0.1}, {"strategy": "diffusers.sea_cache", "threshold": 0.1}),
    ]


@pytest.mark.parametrize("model", testbed.names())
def test_equals_diffusers_hooks_on_the_trained_testbed(model):
    """50 steps with CFG as two calls, diffusers' hooks given their cache contexts by cachekit's peer wrapper."""
    pipe = testbed.load(model)
    generate = lambda: pipe([3], seed=0)  # noqa: E731
    reference = generate()
    for ours, theirs in methods_on(model):
        watched = first_attention(pipe.transformer) if ours["strategy"] == "taylorseer" else None
        with cachekit.apply(pipe, ours):
            mine = scheduled(pipe.transformer, generate, watched)
        with apply_diffusers_method(pipe, theirs):
            expected = scheduled(pipe.transformer, generate, watched)
        assert_same(mine, expected, reference)


def test_sea_filter_equals_diffusers():
    latent = torch.randn(4, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    for sigma in (0.0, 0.3, 0.97, 1.0):
        expected = _apply_sea_filter(
            latent.movedim(0, -1), sigma=sigma, power_exp=3.0
        )  # frames, height, width, channels
        torch.testing.assert_close(sea_filter(latent, sigma, 3.0), expected.movedim(-1, 0))


def test_magcache_resampling_equals_diffusers_nearest_interpolation():
    from diffusers.hooks.mag_cache import nearest_interp

    ratios = magcache_presets()["flux-dev"].mag_ratios
    for steps in (1, 10, 28, 50):
        expected = nearest_interp(torch.tensor(ratios, dtype=torch.float64), steps).tolist()
        assert resample(ratios, steps) == tuple(expected)
