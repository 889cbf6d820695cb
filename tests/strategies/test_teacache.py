"""TeaCache against the published rule, written out here with numpy (not cachekit's code)."""

from __future__ import annotations

import json

import numpy as np
import pydantic
import pytest
import torch
from diffusers import FluxTransformer2DModel
from helpers import ExecutionCounter, flux_inputs, install_straight_line

import cachekit
from cachekit.schemas import TeaCacheConfig, teacache_presets
from cachekit.testing import run_flux, tiny_flux_transformer

STEPS = 10
FLUX_DEV = teacache_presets()["flux-dev"].coefficients


class PublishedTeaCache:
    """The rule as published: first/last step compute and reset; otherwise accumulate the
    rescaled relative L1 change of the probe and compute once it reaches the threshold."""

    def __init__(self, coefficients, threshold, probe="modulated_input", warmup=1, steps=STEPS):
        self.rescale = np.poly1d(coefficients)
        self.threshold = threshold
        self.use_embedding = probe == "timestep_embedding"
        self.warmup = warmup
        self.steps = steps
        self.previous: dict[int, torch.Tensor] = {}
        self.accumulated: dict[int, float] = {}

    def __call__(self, step, branch, probe, embedding):
        signal = embedding if self.use_embedding else probe
        if step < self.warmup or step == self.steps - 1:
            compute, self.accumulated[branch] = True, 0.0
        else:
            previous = self.previous[branch]
            change = ((signal - previous).abs().mean() / previous.abs().mean()).cpu().item()
            self.accumulated[branch] += self.rescale(change)
            compute = bool(self.accumulated[branch] >= self.threshold)
            if compute:
                self.accumulated[branch] = 0.0
        self.previous[branch] = signal
        return compute


CASES = [
    pytest.param([1.0, 0.0], 0.08, "modulated_input", id="linear-0.08"),
    pytest.param([1.0, 0.0], 0.15, "modulated_input", id="linear-0.15"),
    pytest.param(FLUX_DEV, 0.4, "modulated_input", id="flux-dev-0.4"),
    pytest.param([1.0, 0.0], 1.0, "timestep_embedding", id="embedding-1.0"),
]


@pytest.mark.parametrize(("coefficients", "threshold", "probe"), CASES)
def test_schedule_and_output_equal_the_published_rule(family, coefficients, threshold, probe):
    pipe, run, _ = family
    config = TeaCacheConfig(coefficients=coefficients, rel_l1_thresh=threshold, probe=probe)
    with cachekit.apply(pipe, config) as handle:
        cached = run(pipe, steps=STEPS)
    span = install_straight_line(pipe.transformer, PublishedTeaCache(coefficients, threshold, probe))
    reference = run(pipe, steps=STEPS)

    stats = handle.stats.last
    for branch in (0, 1):
        assert stats.branches[branch].span_schedule == span.schedule[branch]
    unforced = span.schedule[0][1:-1] + span.schedule[1][1:-1]
    assert any(unforced) and not all(unforced), "the case must both reuse and trigger a compute"
    assert torch.equal(cached, reference)


def test_tiny_threshold_computes_every_step_exactly(family):
    pipe, run, counted = family
    uncached = run(pipe, steps=STEPS)
    counter = ExecutionCounter(counted(pipe.transformer))
    with cachekit.apply(pipe, TeaCacheConfig(coefficients=[1.0, 0.0], rel_l1_thresh=1e-12)) as handle:
        cached = run(pipe, steps=STEPS)
    counter.close()
    assert torch.equal(cached, uncached)
    assert counter.count == STEPS * 2 * len(counted(pipe.transformer))
    assert all(handle.stats.last.branches[b].sites["span"].computed == STEPS for b in (0, 1))


@pytest.mark.parametrize(("warmup", "forced"), [(1, {0, STEPS - 1}), (3, {0, 1, 2, STEPS - 1})])
def test_huge_threshold_computes_only_forced_steps(family, warmup, forced):
    pipe, run, counted = family
    counter = ExecutionCounter(counted(pipe.transformer))
    config = TeaCacheConfig(coefficients=[1.0, 0.0], rel_l1_thresh=1e9, warmup_steps=warmup)
    with cachekit.apply(pipe, config) as handle:
        run(pipe, steps=STEPS)
    counter.close()
    expected = [step in forced for step in range(STEPS)]
    for branch in (0, 1):
        stats = handle.stats.last.branches[branch]
        assert stats.span_schedule == expected
        assert (stats.sites["span"].computed, stats.sites["span"].reused) == (len(forced), STEPS - len(forced))
    assert counter.count == len(forced) * 2 * len(counted(pipe.transformer))


def test_last_step_can_be_left_to_the_rule(flux_pipe):
    config = TeaCacheConfig(coefficients=[1.0, 0.0], rel_l1_thresh=1e9, compute_last_step=False)
    with cachekit.apply(flux_pipe, config) as handle:
        run_flux(flux_pipe, steps=5)
    assert handle.stats.last.branches[0].span_schedule == [True, False, False, False, False]


def test_every_preset_validates_and_is_usable():
    for name in teacache_presets():
        config = TeaCacheConfig(preset=name, rel_l1_thresh=0.1)
        assert TeaCacheConfig.model_validate_json(config.model_dump_json()) == config


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"coefficients": [1.0], "rel_l1_thresh": 0.1}, r"coefficients\n.*at least 2 items"),
        ({"coefficients": [1.0] * 11, "rel_l1_thresh": 0.1}, r"coefficients\n.*at most 10 items"),
        ({"coefficients": [1.0, float("nan")], "rel_l1_thresh": 0.1}, r"coefficients\.1\n.*finite number"),
        ({"rel_l1_thresh": -0.1}, r"rel_l1_thresh\n.*greater than 0"),
        ({"rel_l1_thresh": 0}, r"rel_l1_thresh\n.*greater than 0"),
        ({"preset": "flux"}, r"preset\n.*unknown TeaCache preset 'flux': neither one of .*flux-dev"),
        ({"preset": "flux-dev", "coefficients": [1.0, 0.0]}, r"either coefficients or preset, not both"),
        ({"coefficients": [1.0, 0.0]}, r"rel_l1_thresh is required with explicit coefficients"),
        ({"probe": "output"}, r"probe\n.*'modulated_input', 'timestep_embedding' or 'projected_timestep_embedding'"),
        ({"warmup_steps": 2, "warmup_share": 0.1}, r"give warmup_steps or warmup_share, not both"),
        ({"warmup_share": 1.0}, r"warmup_share\n.*less than 1"),
        ({"warmup_steps": 0}, r"warmup_steps\n.*greater than or equal to 1"),
    ],
)
def test_bad_configs_are_rejected_with_the_field_named(fields, message):
    with pytest.raises(pydantic.ValidationError, match=rf"(?s){message}"):
        TeaCacheConfig(**fields)


def flux_dev_shaped() -> FluxTransformer2DModel:
    """FLUX.1-dev's block counts and guidance embedding at a tiny width."""
    return tiny_flux_transformer(num_layers=19, num_single_layers=38, guidance_embeds=True)


def test_preset_is_picked_from_the_model_config_and_reported():
    handle = cachekit.apply(flux_dev_shaped(), TeaCacheConfig(num_inference_steps=28))
    handle.remove()
    assert handle.stats.info == {
        "preset": "flux-dev",
        "coefficients": list(FLUX_DEV),
        "rel_l1_thresh": 0.25,
        "probe": "modulated_input",
        "warmup_steps": 1,
        "warmup_share": None,
        "compute_last_step": True,
        "preset_note": "picked 'flux-dev' from the model's config, which FLUX.1-Kontext-dev share; no set is "
        "published for those: give preset= to choose deliberately",
        "estimator": {"kind": "copy"},
    }


def test_explicit_settings_override_the_preset():
    config = TeaCacheConfig(
        preset="wan2.1-t2v-1.3b-ret", rel_l1_thresh=0.3, probe="modulated_input", allow_other_model=True
    )
    handle = cachekit.apply(flux_dev_shaped(), config.model_copy(update={"num_inference_steps": 4}))
    handle.remove()
    assert handle.stats.info["preset"] == "wan2.1-t2v-1.3b-ret"
    assert (handle.stats.info["rel_l1_thresh"], handle.stats.info["probe"]) == (0.3, "modulated_input")
    assert handle.stats.info["warmup_steps"] == 5


def test_no_fitting_preset_lists_them_and_points_to_calibration(flux_pipe):
    with pytest.raises(ValueError, match=r"no TeaCache preset fits FluxTransformer2DModel .*flux-dev.*calibrate"):
        cachekit.apply(flux_pipe, TeaCacheConfig())
    assert "_diffusers_hook" not in vars(flux_pipe.transformer.transformer_blocks[0])


def test_preset_without_a_threshold_asks_for_one(flux_pipe, tmp_path):
    path = tmp_path / "fitted.json"
    path.write_text(json.dumps({"name": "fitted", "adapter": "flux", "coefficients": [1.0, 0.0]}))
    with pytest.raises(ValueError, match=r"'fitted' suggests no threshold: set rel_l1_thresh"):
        cachekit.apply(flux_pipe, TeaCacheConfig(preset=str(path)))


def test_a_bare_transformer_forces_the_last_step_or_asks_for_the_length():
    """The strategy instance decides whether the length is needed (TeaCache sets it from its config
    and preset): without it a bare transformer is refused; with it the last step computes."""
    model = tiny_flux_transformer()
    config = TeaCacheConfig(coefficients=[1.0, 0.0], rel_l1_thresh=1e9)
    with pytest.raises(ValueError, match=r"'teacache' must know the generation's length: .*num_inference_steps"):
        cachekit.apply(model, config)
    with cachekit.apply(model, config.model_copy(update={"num_inference_steps": 6})) as handle:
        for index in range(6):
            model(**flux_inputs(timestep=1 - index / 6))
    assert handle.stats.last.branches[0].span_schedule == [True, False, False, False, False, True]
    with cachekit.apply(model, config.model_copy(update={"compute_last_step": False})) as handle:  # no length needed
        for index in range(6):
            model(**flux_inputs(timestep=1 - index / 6))
    assert handle.stats.last.branches[0].span_schedule == [True, False, False, False, False, False]


def test_warmup_as_a_share_of_the_steps(flux_pipe):
    config = TeaCacheConfig(coefficients=[1.0, 0.0], rel_l1_thresh=1e9, warmup_share=0.25, compute_last_step=False)
    with cachekit.apply(flux_pipe, config) as handle:
        run_flux(flux_pipe, steps=10)
    assert handle.stats.last.branches[0].span_schedule == [True, True, True, *[False] * 7]  # steps < 2.5


def test_ret_steps_preset_reads_the_projected_embedding_and_leaves_the_last_step_to_the_rule(wan_pipe):
    """Wan2.1's ret-steps sets were fitted on condition_embedder's second output (timestep_proj):
    the schedule is the published rule replayed on that signal, recorded here with a plain hook:
    5 steps forced, the last one not."""
    seen: list[torch.Tensor] = []
    hook = wan_pipe.transformer.condition_embedder.register_forward_hook(lambda _, a, out: seen.append(out[1]))
    threshold = 0.3
    config = TeaCacheConfig(preset="wan2.1-t2v-1.3b-ret", rel_l1_thresh=threshold)
    try:
        with cachekit.apply(wan_pipe, config) as handle:
            from cachekit.testing import run_wan

            run_wan(wan_pipe, steps=STEPS)
    finally:
        hook.remove()
    assert handle.stats.info["probe"] == "projected_timestep_embedding"
    rescale = np.poly1d(teacache_presets()["wan2.1-t2v-1.3b-ret"].coefficients)
    for branch in (0, 1):
        signals = seen[branch::2]
        expected, accumulated = [], 0.0
        for index, signal in enumerate(signals):
            if index < 5:
                compute, accumulated = True, 0.0
            else:
                previous = signals[index - 1]
                accumulated += rescale(((signal - previous).abs().mean() / previous.abs().mean()).item())
                compute = accumulated >= threshold
                accumulated = 0.0 if compute else accumulated
            expected.append(bool(compute))
        assert handle.stats.last.branches[branch].span_schedule == expected
        assert not all(expected[5:]), "the rule must skip somewhere after the warm-up"
