"""The shipped testbed: trained models that generate their requested digits, and the yardstick."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cachekit
from cachekit import testbed
from cachekit.schemas import UniformConfig
from cachekit.testbed.data import real_digits, split

# 5 samples per class, 50 steps, CFG: the acceptance bar of the trained models.
ACCURACY_BAR = 0.85


def test_names_and_shapes():
    assert testbed.names() == ["flux-digits", "wan-moving-digits"]
    image = testbed.load("flux-digits")(labels=[1, 2], num_inference_steps=4)
    video = testbed.load("wan-moving-digits")(labels=[3], num_inference_steps=4)
    assert image.shape == (2, 1, 16, 16) and video.shape == (1, 1, 4, 16, 16)
    assert image.abs().max() <= 1 and video.abs().max() <= 1
    with pytest.raises(KeyError, match="unknown testbed model 'sd3'; known: flux-digits, wan-moving-digits"):
        testbed.load("sd3")


def test_classifier_scores_held_out_real_digits():
    images, labels = real_digits()
    _, held_out = split(len(labels))
    result = testbed.score(images[held_out], labels[held_out])
    assert result.accuracy >= 0.95
    assert result.frechet_distance < 5.0  # real vs real: small


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux-digits", "wan-moving-digits"])
def test_trained_models_generate_the_requested_class_and_untrained_do_not(name):
    trained = testbed.evaluate(testbed.load(name))
    untrained = testbed.evaluate(testbed.load(name, trained=False))
    print(f"{name}: trained {trained}, untrained {untrained}")
    assert trained.accuracy >= ACCURACY_BAR
    assert untrained.accuracy <= 0.3
    assert trained.frechet_distance < untrained.frechet_distance


@pytest.mark.parametrize("name", ["flux-digits", "wan-moving-digits"])
def test_shipped_weights_generate_digits(name):
    """A quick guard on the shipped weights (the full bar is the slow test above)."""
    result = testbed.evaluate(testbed.load(name), per_class=1, num_inference_steps=20)
    assert result.accuracy >= 0.7


def test_testbed_pipeline_is_a_cachekit_target():
    pipe = testbed.load("flux-digits")
    reference = pipe(labels=[4, 9], seed=1, num_inference_steps=10)
    with cachekit.apply(pipe, UniformConfig(interval=2)) as handle:
        cached = pipe(labels=[4, 9], seed=1, num_inference_steps=10)
        pipe(labels=[4, 9], seed=1, num_inference_steps=10, batched_cfg=True)
    first, batched = handle.stats.generations
    assert first.num_steps == 10 and sorted(first.branches) == [0, 1]
    assert list(batched.branches) == [0]
    assert first.branches[1].span_schedule == [True, False] * 4 + [True, True]
    assert not torch.equal(cached, reference)
    assert torch.equal(pipe(labels=[4, 9], seed=1, num_inference_steps=10), reference)


def test_batched_cfg_matches_separate_calls():
    pipe = testbed.load("flux-digits")
    separate = pipe(labels=[0, 5], seed=2, num_inference_steps=8)
    batched = pipe(labels=[0, 5], seed=2, num_inference_steps=8, batched_cfg=True)
    torch.testing.assert_close(batched, separate, atol=1e-4, rtol=0)


def test_loads_offline_from_the_installed_package(tmp_path):
    script = textwrap.dedent(
        """
        import json, torch, cachekit.testbed as testbed
        pipe = testbed.load("wan-moving-digits")
        video = pipe(labels=[7], num_inference_steps=2)
        print(json.dumps({"file": testbed.weights.__file__, "shape": list(video.shape)}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["shape"] == [1, 1, 4, 16, 16]
    if os.environ.get("CACHEKIT_INSTALLED_TESTS"):  # set by the nox session, which installs a wheel
        assert "site-packages" in report["file"]
