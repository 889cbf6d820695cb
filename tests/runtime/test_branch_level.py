"""The branch level: the second CFG branch produced from the first plus the estimated difference,
with CFG as two calls and as one batched call, composed with a step-level strategy, and its errors."""

from __future__ import annotations

import copy

import pytest
import torch

import cachekit
from cachekit import registry
from cachekit.counting import WorkCounter
from cachekit.errors import BranchLevelError, EstimatorError, KeptMemoryError
from cachekit.schemas import BranchLevelConfig, FasterCacheConfig, UniformConfig
from cachekit.schemas.checked import ConfigError
from cachekit.testing import RunCounter, run_flux, tiny_flux_pipeline, tiny_flux_transformer

STEPS = 12
LATENTS = (1, 4, 2, 10, 10)  # a 10 x 10 grid: the frequency bands are not trivial


def wan_example():
    example = registry.registry().adapters["wan"].example()
    latents = torch.randn(LATENTS, generator=torch.Generator().manual_seed(3))
    return example, latents


def timesteps(steps: int = STEPS) -> list[float]:
    return [1000.0 * (1 - index / steps) for index in range(steps)]


def two_calls(example, latents, steps: int = STEPS):
    """Euler with CFG as two calls per step (cond first); every call's latents and predictions."""
    seen = []
    with torch.no_grad():
        for t in timesteps(steps):
            cond, uncond = example(latents, t, 0), example(latents, t, 1)
            seen.append((latents, cond, uncond))
            latents = latents - (uncond + 3.0 * (cond - uncond)) / steps
    return latents, seen


def batched(example, latents, steps: int = STEPS):
    """The same loop with CFG as one call, the unconditional half first."""
    with torch.no_grad():
        for t in timesteps(steps):
            parts = [example.inputs(latents, t, branch) for branch in (1, 0)]
            inputs = {
                name: torch.cat([parts[0][name], parts[1][name]]) if isinstance(value, torch.Tensor) else value
                for name, value in parts[1].items()
            }
            uncond, cond = example.model(**inputs, return_dict=False)[0].chunk(2)
            latents = latents - (uncond + 3.0 * (cond - uncond)) / steps
    return latents


def low_band(value: torch.Tensor) -> torch.Tensor:
    """FasterCache's low band as the paper's code writes it: every dimension shifted, a disc of radius
    min(h, w) // 5 kept, shifted back."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(value))
    height, width = value.shape[-2:]
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    disc = (columns - width // 2) ** 2 + (rows - height // 2) ** 2 <= (min(height, width) // 5) ** 2
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum * disc)).real


@pytest.mark.parametrize("estimator", ["copy", "fastercache"])
def test_a_produced_branch_is_the_first_branch_plus_the_last_difference(estimator):
    """Uniform computes every step; the branch level produces the second call on steps 1, 2, 4, 5, ...
    Each produced prediction equals the first branch's uncached prediction at the same latents plus
    the difference recorded at the last step both were computed (for fastercache, its bands weighted
    by 1.1 per skip inside their windows), computed here from an uncached copy of the model."""
    example, latents = wan_example()
    bare = copy.deepcopy(example.model)
    config = UniformConfig(interval=1, num_inference_steps=STEPS, branches={"interval": 3, "estimator": estimator})
    with cachekit.apply(example.model, config) as handle:
        _, seen = two_calls(example, latents)

    bare_example = copy.copy(example)
    bare_example.model = bare
    weights = [1.0, 1.0]
    difference = None
    produced = 0
    for index, (t, (x, cond, uncond)) in enumerate(zip(timesteps(), seen, strict=True)):
        with torch.no_grad():
            expected_cond, expected_uncond = bare_example(x, t, 0), bare_example(x, t, 1)
        assert torch.equal(cond, expected_cond)
        if index % 3 == 0:
            assert torch.equal(uncond, expected_uncond)
            difference = expected_uncond - expected_cond
            weights = [1.0, 1.0]
            continue
        produced += 1
        if estimator == "copy":
            expected = expected_cond + difference
        else:
            weights[0] *= 1.1 if 99 < t < 901 else 1.0
            weights[1] *= 1.1 if -1 < t < 301 else 1.0
            low = low_band(difference)
            expected = expected_cond + weights[0] * low + weights[1] * (difference - low)
        torch.testing.assert_close(uncond, expected, rtol=0, atol=1e-5)
    assert handle.stats.last.branches[1].produced == produced == 8
    assert "8 produced from the other branch" in str(handle.stats)


def test_batched_cfg_matches_two_calls_and_counts_half_the_blocks_of_a_halved_call():
    """The same config with CFG batched (the conditional half run alone on skipped steps) gives the
    two-call result, and the blocks counted from the outside spend the same share: a block run on
    half the batch counts half."""
    example, latents = wan_example()
    shares, outputs = {}, {}
    for cfg, run in (("calls", lambda: two_calls(example, latents)[0]), ("batched", lambda: batched(example, latents))):
        config = UniformConfig(interval=2, num_inference_steps=STEPS, branches={"interval": 3, "cfg": cfg})
        counter = WorkCounter(example.model, cachekit.resolve_adapter(example.model)(example.model))
        with counter, cachekit.apply(example.model, config) as handle:
            outputs[cfg] = run()
        shares[cfg] = counter.work.block_share
    torch.testing.assert_close(outputs["batched"], outputs["calls"], rtol=0, atol=1e-5)
    computed = [index % 2 == 0 or index == STEPS - 1 for index in range(STEPS)]  # uniform: every 2nd and the last
    both = [c and sum(computed[:index]) % 3 == 0 for index, c in enumerate(computed)]  # every 3rd computed step
    expected = (sum(computed) + sum(both)) / (2 * STEPS)
    assert [index for index, b in enumerate(both) if b] == [0, 6, 11]
    assert shares["calls"] == pytest.approx(expected)
    assert shares["batched"] == pytest.approx(expected)
    assert handle.stats.last.branches[0].span_schedule == computed


def test_a_step_skipped_by_the_step_level_skips_both_branches():
    """Uniform reuses odd steps (and computes the last); the branch level computes the second branch on
    every 3rd step the first computed (steps 0, 6, 11) and produces it on every other step, so a step
    the step level skips runs no block for either branch."""
    example, latents = wan_example()
    blocks = cachekit.resolve_adapter(example.model)(example.model).blocks()
    counter = RunCounter(blocks)
    config = UniformConfig(interval=2, num_inference_steps=STEPS, branches={"interval": 3})
    with cachekit.apply(example.model, config) as handle:
        two_calls(example, latents)
    counter.close()
    stats = handle.stats.last.branches
    assert stats[1].produced == STEPS - 3
    assert stats[1].span_schedule == [True, True, True]  # the produced calls decide nothing
    assert sum(stats[0].span_schedule) == 7
    assert counter.counts == [7 + 3] * len(blocks)


def test_without_cfg_the_branch_level_is_a_named_error():
    pipe = tiny_flux_pipeline()
    with (
        cachekit.apply(pipe, UniformConfig(interval=2, branches={"interval": 2})),
        pytest.raises(
            BranchLevelError, match=r"called the transformer once per step up to step 1: it runs without CFG"
        ),
    ):
        pipe("a red cat", num_inference_steps=4, height=32, width=32, max_sequence_length=16)


def test_a_batched_call_with_an_odd_batch_is_a_named_error():
    from helpers import flux_inputs

    model = tiny_flux_transformer()
    config = UniformConfig(interval=1, num_inference_steps=4, branches={"interval": 2, "cfg": "batched"})
    with cachekit.apply(model, config), pytest.raises(BranchLevelError, match=r"has a batch of 1.*guidance_scale > 1"):
        model(**flux_inputs(batch=1, timestep=1.0))


def test_the_fastercache_difference_refuses_tokens_and_residuals():
    with pytest.raises(BranchLevelError, match=r"estimator 'fastercache' takes a model's predictions.*branches="):
        cachekit.apply(tiny_flux_transformer(), UniformConfig(num_inference_steps=4, estimator="fastercache"))
    pipe = tiny_flux_pipeline()
    config = UniformConfig(interval=1, branches={"interval": 2, "estimator": "fastercache"})
    with cachekit.apply(pipe, config), pytest.raises(EstimatorError, match=r"not tokens \(Flux.*'estimator': 'copy'"):
        run_flux(pipe, steps=4)


def test_bad_branch_configs_are_named():
    with pytest.raises(ConfigError, match="window must be \\(low, high\\) with low < high"):
        BranchLevelConfig(window=(600, 100))
    with pytest.raises(ConfigError, match="interval"):
        BranchLevelConfig(interval=0)
    with pytest.raises(ConfigError, match="cfg"):
        BranchLevelConfig(cfg="interleaved")
    with pytest.raises(ConfigError, match="attention_window must be"):
        FasterCacheConfig(attention_window=(681, -1))


@pytest.mark.parametrize("estimator", ["copy", "fastercache"])
def test_what_the_branch_level_keeps_is_counted_and_held_to_the_limit(estimator):
    """The difference is one float32 prediction (two bands for fastercache): counted in the stats and
    in the projection `max_kept_bytes` is held to, before it is kept."""
    example, latents = wan_example()
    difference = torch.Size(LATENTS).numel() * 4 * (2 if estimator == "fastercache" else 1)
    config = UniformConfig(interval=1, num_inference_steps=STEPS, branches={"interval": 3, "estimator": estimator})
    with cachekit.apply(example.model, config) as handle:
        two_calls(example, latents, steps=4)
    assert handle.stats.last.difference_bytes == difference
    assert "the branch level keeps" in str(handle.stats)
    span = handle._runtime.memory.projected()[0] - difference
    tight = config.model_copy(update={"max_kept_bytes": span + difference - 1})
    with cachekit.apply(example.model, tight), pytest.raises(KeptMemoryError, match=r"above max_kept_bytes"):
        two_calls(example, latents, steps=4)
    with cachekit.apply(example.model, tight.model_copy(update={"max_kept_bytes": span + difference})):
        two_calls(example, latents, steps=4)
