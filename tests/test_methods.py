"""The step-level methods' rules, checked from the outside: what they decide from, what always
runs, and the named errors for settings that cannot work."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch
from helpers import RunCounter, flux_inputs

import cachekit
from cachekit.schemas import EasyCacheConfig, FBCacheConfig, MagCacheConfig, SeaCacheConfig, TaylorSeerConfig
from cachekit.signals import relative_l1
from cachekit.testbed import load
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


def test_magcache_ratio_count_must_match_the_steps_unless_resampled():
    pipe = load("flux-digits")
    message = r"28 magnitude ratios but the generation has 12 steps.*interpolate=True"
    with pytest.raises(ValueError, match=message), cachekit.apply(pipe, MagCacheConfig(preset="flux-dev")):
        pipe([1], num_inference_steps=12)
    with pytest.raises(ValueError, match=r"28 magnitude ratios but the generation has 12 steps"):
        cachekit.apply(pipe.transformer, MagCacheConfig(preset="flux-dev", num_inference_steps=12))
    with cachekit.apply(pipe, MagCacheConfig(preset="flux-dev", interpolate=True, threshold=0.5)) as handle:
        pipe([1], num_inference_steps=12)
    assert handle.stats.last.branches[0].sites["span"].reused > 0


def test_magcache_needs_ratios_from_one_place_and_a_preset_of_its_family():
    with pytest.raises(pydantic.ValidationError, match=r"give mag_ratios or preset, not both"):
        MagCacheConfig(preset="flux-dev", mag_ratios=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"no MagCache ratio set is known for this FluxTransformer2DModel .*calibrate"):
        cachekit.apply(tiny_flux_transformer(), MagCacheConfig(num_inference_steps=4))
    with cachekit.apply(load("wan-moving-digits"), MagCacheConfig()) as handle:
        assert handle.stats.info["preset"] == "wan-moving-digits"  # picked from the model's config
    with pytest.raises(pydantic.ValidationError, match=r"unknown MagCache preset 'flux-dvd'.*flux-dev"):
        MagCacheConfig(preset="flux-dvd")
    with pytest.raises(pydantic.ValidationError, match=r"mag_ratios\.0\n.*greater than 0"):
        MagCacheConfig(mag_ratios=(0.0, 1.0))
    with pytest.raises(
        ValueError, match=r"preset 'flux-dev' was made on a 'flux' model, not this WanTransformer3DModel"
    ):
        cachekit.apply(load("wan-moving-digits"), MagCacheConfig(preset="flux-dev", interpolate=True))


def test_a_magcache_file_calibrated_on_another_model_of_the_family_is_refused(tmp_path):
    """The same identity rule as TeaCache's: another model's ratios do not fit this one."""
    import json

    from cachekit.testing import tiny_flux_transformer as flux

    other, model = flux(num_layers=2), flux()
    identity = cachekit.resolve_adapter(other)(other).identity()
    preset = tmp_path / "other.json"
    preset.write_text(json.dumps({"name": "other", "adapter": "flux", "identity": identity, "mag_ratios": [1.0, 0.9]}))
    config = MagCacheConfig(preset=str(preset), interpolate=True, num_inference_steps=4)
    with pytest.raises(ValueError, match=rf"MagCache preset 'other' was calibrated on {identity}, not on this Flux"):
        cachekit.apply(model, config)
    cachekit.apply(other, config).remove()  # on its own model it is taken


def test_magcache_skips_while_the_accumulated_error_stays_small():
    """Ratios 0.9 every step from step 2: rho = 0.9, E = 0.1 after one skip; 0.81, E = 0.29 after two."""
    model = tiny_flux_transformer()
    config = MagCacheConfig(mag_ratios=(1.0, *[0.9] * 9), threshold=0.2, max_skip_steps=5, retention_ratio=0.2)
    with cachekit.apply(model, config.model_copy(update={"num_inference_steps": 10})) as handle:
        for index in range(10):
            model(**flux_inputs(timestep=1 - index / 10))
    # steps 0, 1 retained; then skip (E 0.1), compute (E 0.29 > 0.2: reset), skip, compute, ...
    assert handle.stats.last.branches[0].span_schedule == [
        True,
        True,
        False,
        True,
        False,
        True,
        False,
        True,
        False,
        True,
    ]


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


def test_seacache_forces_its_ends_and_caps_skips_in_a_row():
    pipe = load("flux-digits")
    with cachekit.apply(pipe, SeaCacheConfig(threshold=1000.0, retention_steps=2, cache_end_steps=3)) as handle:
        pipe([4], num_inference_steps=12)
    skips = [True, True, False, False, True, False, False, True, False, True, True, True]
    assert handle.stats.last.branches[0].span_schedule == skips  # at most 2 skips in a row (the default cap)


def test_taylorseer_computes_on_diffusers_schedule():
    model = tiny_flux_transformer()
    with cachekit.apply(model, TaylorSeerConfig(level="span", num_inference_steps=16)) as handle:
        for index in range(16):
            model(**flux_inputs(timestep=1 - index / 16))
    computed = [index for index, c in enumerate(handle.stats.last.branches[0].span_schedule) if c]
    assert computed == [0, 1, 2, 4, 9, 14]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"strategy": "fbcache", "first_blocks": 0}, r"first_blocks\n.*greater than or equal to 1"),
        ({"strategy": "fbcache", "threshold": -0.1}, r"threshold\n.*greater than or equal to 0"),
        ({"strategy": "taylorseer", "warmup_steps": 0}, r"warmup_steps\n.*greater than or equal to 1"),
        (
            {"strategy": "taylorseer", "cooldown_from": 2},
            r"cooldown_from \(2\) must come after the warm-up \(3 steps\)",
        ),
        ({"strategy": "taylorseer", "level": "blocks"}, r"level\n.*'span', 'attention' or 'modules'"),
        ({"strategy": "magcache", "preset": "flux-dev", "retention_ratio": 1.0}, r"retention_ratio\n.*less than 1"),
        ({"strategy": "seacache", "power_exp": 0}, r"power_exp\n.*greater than 0"),
        ({"strategy": "easycache", "warmup_steps": 1}, r"warmup_steps\n.*greater than or equal to 2"),
        ({"strategy": "easycache", "threshold": math.inf}, r"threshold\n.*finite number"),
    ],
)
def test_bad_method_configs_are_named(config, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        cachekit.make_config(config)
