"""MagCache: skips while the error accumulated from per-step magnitude ratios stays small; ratio sets and presets."""

from __future__ import annotations

import pydantic
import pytest
from helpers import flux_inputs

import cachekit
from cachekit.schemas import MagCacheConfig
from cachekit.testbed import load
from cachekit.testing import tiny_flux_transformer


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
