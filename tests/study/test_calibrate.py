"""Calibration fits TeaCache's polynomial to any model; the tuner hits a target."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import cachekit
from cachekit.calibrate import calibrate, fit, record, write_preset
from cachekit.schemas import CalibrationSpec, TeaCacheConfig, load_preset
from cachekit.signals import relative_l1
from cachekit.study.models import TestbedModel
from cachekit.testing import run_flux, tiny_flux_pipeline
from cachekit.tune import BISECTIONS, Tuner

TRUTH = [3.0, -2.0, 0.5, 0.1, 0.01]


def test_fit_recovers_a_known_polynomial_from_noisy_samples():
    generator = np.random.default_rng(0)
    x = generator.uniform(0, 1, 2000)
    y = np.polyval(TRUTH, x) + generator.normal(0, 1e-3, x.shape)
    result = fit(list(x), list(y), order=4)
    np.testing.assert_allclose(result.coefficients, TRUTH, atol=0.03)
    assert result.rmse == pytest.approx(1e-3, rel=0.1) and result.r2 > 0.999 and result.samples == 2000
    with pytest.raises(ValueError, match="a degree-4 fit needs more than 4 samples, got 3"):
        fit([0.1, 0.2, 0.3], [1.0, 2.0, 3.0])


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    spec = CalibrationSpec(model="flux-digits", labels=[1, 6], seeds=[0], steps=12)
    result = calibrate(spec)
    path = write_preset(result, tmp_path_factory.mktemp("calibration") / "flux-digits.json")
    return spec, result, path


def test_record_sees_every_call_of_both_branches(calibrated):
    spec, result, _ = calibrated
    recording = result.recording
    assert len(recording.x) == 2 * 2 * (spec.steps - 1)  # conditions x branches x steps after the first
    assert sorted(set(recording.branches)) == [0, 1]
    assert recording.steps[:4] == [1, 1, 2, 2]
    assert all(x > 0 for x in recording.x) and all(y > 0 for y in recording.y)


def test_preset_file_round_trip_and_use(calibrated):
    _, result, path = calibrated
    preset = load_preset(str(path))
    assert preset.coefficients == result.fit.coefficients and len(preset.coefficients) == 5
    assert preset.identity == result.identity and preset.identity.startswith("flux:")
    assert preset.fit["samples"] == len(result.recording.x) and len(preset.mag_ratios) == 12
    pipe = cachekit.testbed.load("flux-digits")
    with cachekit.apply(pipe, TeaCacheConfig(preset=str(path), rel_l1_thresh=0.05)) as handle:
        pipe([4], num_inference_steps=12)
    assert handle.stats.info["preset"] == "flux-digits"  # named after the file
    assert handle.stats.info["coefficients"] == list(result.fit.coefficients)


def test_calibrated_preset_refuses_another_model_unless_allowed(calibrated):
    _, _, path = calibrated
    other = tiny_flux_pipeline()
    with pytest.raises(
        ValueError, match=r"was calibrated on flux:\w+, not on this FluxTransformer2DModel \(flux:\w+\)"
    ):
        cachekit.apply(other, TeaCacheConfig(preset=str(path), rel_l1_thresh=0.1))
    with cachekit.apply(other, TeaCacheConfig(preset=str(path), rel_l1_thresh=0.1, allow_other_model=True)):
        run_flux(other, steps=4)


def test_timestep_embedding_probe_is_recorded():
    model = TestbedModel("flux-digits", CalibrationSpec(model="flux-digits", labels=[2], steps=6))
    embedding = record(model, seed=0, condition="2", probe="timestep_embedding")
    modulated = record(model, seed=0, condition="2", probe="modulated_input")
    assert len(embedding.x) == 2 * 5
    assert embedding.y == modulated.y  # the same uncached outputs
    assert embedding.x != pytest.approx(modulated.x, rel=1e-3)  # another signal


@pytest.mark.parametrize(
    ("strategy", "target"),
    [({"strategy": "teacache", "coefficients": [1.0, 0.0]}, 0.5), ({"strategy": "uniform"}, 0.35)],
)
def test_tuner_meets_a_computed_ratio_within_one_step(strategy, target):
    steps = 20
    model = TestbedModel("flux-digits", CalibrationSpec(model="flux-digits", labels=[5], steps=steps))
    result = Tuner(model, strategy, seeds=[1000], conditions=["5"]).to_ratio(target)
    assert abs(result.chosen.computed_steps - target * steps) <= 1
    if strategy["strategy"] == "teacache":  # the bisection ends once met as closely as a step allows
        assert len(result.trials) < BISECTIONS and abs(result.trials[-1].computed - target) <= 1 / (2 * steps)
    assert 0 < result.chosen.quality < float("inf")
    with cachekit.apply(model.target, result.config(strategy)) as handle:  # the chosen setting reproduces
        model.generate(1000, "5")
    assert handle.stats.last.branches[0].sites["span"].computed == result.chosen.computed_steps


def test_tuner_psnr_floor():
    model = TestbedModel("flux-digits", CalibrationSpec(model="flux-digits", labels=[5], steps=20))
    tuner = Tuner(model, {"strategy": "uniform"}, seeds=[1000], conditions=["5"])
    result = tuner.to_quality(40.0)
    assert result.chosen.quality >= 40.0
    more_reuse = [t for t in result.trials if t.computed < result.chosen.computed]
    assert all(t.quality < 40.0 for t in more_reuse)


def test_a_weak_calibration_fit_is_warned():
    from cachekit.calibrate import CalibrationWarning, check_fit, fit

    rng = np.random.default_rng(0)
    x = list(np.linspace(0, 1, 40))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        check_fit(fit(x, [2 * v + 0.01 * rng.standard_normal() for v in x], order=2))  # a good fit: quiet
    with pytest.warns(CalibrationWarning, match=r"a weak fit: R² 0\.\d\d \(below 0\.8\) over 40 calls"):
        check_fit(fit(x, list(rng.standard_normal(40)), order=2))


def test_unknown_knob():
    model = TestbedModel("flux-digits", CalibrationSpec(model="flux-digits", labels=[5], steps=4, order=2))
    with pytest.raises(
        ValueError,
        match="strategy 'pab' declares no knob to tune; strategies with one: easycache, fbcache, magcache, schedule, "
        "seacache, taylorseer, teacache, uniform",
    ):
        Tuner(model, {"strategy": "pab"}, seeds=[7], conditions=["5"])


def test_calibrate_cli(tmp_path):
    spec = tmp_path / "calibration.toml"
    spec.write_text('model = "flux-digits"\nlabels = [3]\nsteps = 8\n')
    result = subprocess.run(
        [sys.executable, "-m", "cachekit", "calibrate", str(spec), "--out", str(tmp_path / "p.json")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "coefficients" in result.stdout and (tmp_path / "p.png").stat().st_size > 0
    assert json.loads((tmp_path / "p.json").read_text())["identity"].startswith("flux:")


@pytest.mark.slow
def test_calibrate_then_tune_then_use_closes_the_loop(tmp_path):
    """The README's flow: calibrate names the preset after --out and says what to run next; the
    preset alone has no threshold until `tune --write` stores the one it chose."""
    spec = tmp_path / "calibration.toml"
    spec.write_text('model = "flux-digits"\nlabels = [3]\nsteps = 8\nheld_out_seeds = [1000]\n')

    def cli(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "cachekit", *args]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)

    calibrated = cli("calibrate", str(spec), "--out", "mine.json", "--quiet")
    assert calibrated.returncode == 0, calibrated.stderr
    strategy = '{"strategy": "teacache", "preset": "mine.json"}'
    assert f"cachekit tune {spec} --strategy '{strategy}' --ratio 0.4 --write" in calibrated.stdout
    assert json.loads((tmp_path / "mine.json").read_text())["name"] == "mine"
    pipe = cachekit.testbed.load("flux-digits")
    with pytest.raises(ValueError, match=r"preset 'mine' suggests no threshold: set rel_l1_thresh or find one with"):
        cachekit.apply(pipe, TeaCacheConfig(preset=str(tmp_path / "mine.json")))

    tuned = cli("tune", str(spec), "--strategy", strategy, "--ratio", "0.5", "--write")
    assert tuned.returncode == 0, tuned.stderr
    chosen = float(re.search(r"now takes rel_l1_thresh (\S+)", tuned.stdout).group(1))
    preset = load_preset(str(tmp_path / "mine.json"))
    assert (
        preset.thresholds[0] == pytest.approx(chosen, rel=1e-4) and "tuned to a computed share of 0.5" in preset.notes
    )
    assert "tuning" in tuned.stderr  # the progress bar
    with cachekit.apply(pipe, TeaCacheConfig(preset=str(tmp_path / "mine.json"))) as handle:
        pipe([3], num_inference_steps=8)
    assert handle.stats.info["rel_l1_thresh"] == preset.thresholds[0]

    refused = cli(
        "tune", str(spec), "--strategy", '{"strategy": "teacache", "preset": "flux-dev"}', "--ratio", "0.5", "--write"
    )
    assert (
        refused.returncode == 2 and "--write stores the tuned threshold in the strategy's preset file" in refused.stderr
    )


@pytest.mark.slow
def test_calibrated_coefficients_beat_the_published_flux_ones_at_equal_compute():
    """Both tuned to compute 40% of the calls on held-out seeds; PSNR read off each one's
    measured (computed share, PSNR) curve at exactly that share."""
    spec = CalibrationSpec(model="flux-digits", labels=list(range(10)), seeds=[0, 1], steps=50)
    model = TestbedModel("flux-digits", spec)
    calibrated = calibrate(spec, model).fit.coefficients
    published = cachekit.schemas.teacache_presets()["flux-dev"].coefficients
    target, psnr = 0.4, {}
    for name, coefficients in (("calibrated", calibrated), ("flux-dev", published)):
        tuner = Tuner(
            model, {"strategy": "teacache", "coefficients": list(coefficients)}, [1000, 1001], ["0", "4", "7"]
        )
        trials = sorted(tuner.to_ratio(target).trials, key=lambda trial: trial.computed)
        psnr[name] = float(np.interp(target, [t.computed for t in trials], [t.quality for t in trials]))
    print(f"PSNR at {target:.0%} of calls computed: {psnr}")
    assert psnr["calibrated"] >= psnr["flux-dev"]


def test_the_projected_embedding_is_recorded_on_wan():
    """The ret-steps signal: condition_embedder's timestep_proj, recorded with a plain hook here too."""
    model = TestbedModel("wan-moving-digits", CalibrationSpec(model="wan-moving-digits", labels=[2], steps=6))
    seen: list[torch.Tensor] = []
    hook = model.transformer.condition_embedder.register_forward_hook(lambda _, a, out: seen.append(out[1]))
    try:
        projected = record(model, seed=0, condition="2", probe="projected_timestep_embedding")
    finally:
        hook.remove()
    expected = [relative_l1(seen[i], seen[i - 2]) for i in range(2, len(seen))]  # per branch: cond, uncond
    assert projected.x == pytest.approx(expected)


@pytest.mark.parametrize(
    ("strategy", "budget"),
    [({"strategy": "teacache", "coefficients": [1.0, 0.0]}, 0.45), ({"strategy": "uniform"}, 0.4)],
)
def test_tuning_to_a_budget_spends_at_most_it_with_the_best_quality_found(strategy, budget):
    steps = 20
    model = TestbedModel("flux-digits", CalibrationSpec(model="flux-digits", labels=[5], steps=steps))
    result = Tuner(model, strategy, seeds=[1000], conditions=["5"]).to_budget(budget)
    within = [trial for trial in result.trials if trial.computed <= budget + 1e-9]
    assert result.chosen.computed <= budget and result.chosen in within
    assert result.chosen.quality == max(trial.quality for trial in within)
    assert budget - result.chosen.computed <= 3 / steps  # not far below it either


def test_a_budget_below_what_the_strategy_can_reach_names_the_smallest_share():
    from cachekit.tune import BudgetError

    model = TestbedModel("flux-digits", CalibrationSpec(model="flux-digits", labels=[5], steps=10))
    with pytest.raises(
        BudgetError,
        match=r"uniform cannot spend as little as 5\.0% of block executions here: at interval=10, reusing all it "
        r"can, it spends 20\.0% \(its warm-up, last step and always-computed blocks\); give a budget of at least "
        r"20\.0%",
    ):
        Tuner(model, {"strategy": "uniform"}, seeds=[1000], conditions=["5"]).to_budget(0.05)


@pytest.mark.parametrize(
    ("strategy", "values"),
    [
        ({"strategy": "uniform"}, [1, 2, 3, 5, 8]),
        ({"strategy": "teacache", "coefficients": [1.0, 0.0]}, [0.01, 0.1, 0.5, 2.0]),
    ],
)
def test_the_share_a_knob_spends_falls_as_it_reuses_more(strategy, values):
    """What the budget search relies on: along the knob, toward reusing more, the share of block
    executions never rises (so bisection finds the budget's edge)."""
    model = TestbedModel("flux-digits", CalibrationSpec(model="flux-digits", labels=[5], steps=12))
    tuner = Tuner(model, strategy, seeds=[1000], conditions=["5"])
    shares = [tuner.measure(value).computed for value in values]
    assert shares == sorted(shares, reverse=True) and shares[0] > shares[-1], shares
