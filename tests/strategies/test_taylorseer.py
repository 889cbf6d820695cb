"""TaylorSeer: computes on diffusers' schedule and forecasts between."""

from __future__ import annotations

from helpers import flux_inputs

import cachekit
from cachekit.schemas import TaylorSeerConfig
from cachekit.testing import tiny_flux_transformer


def test_taylorseer_computes_on_diffusers_schedule():
    model = tiny_flux_transformer()
    with cachekit.apply(model, TaylorSeerConfig(level="span", num_inference_steps=16)) as handle:
        for index in range(16):
            model(**flux_inputs(timestep=1 - index / 16))
    computed = [index for index, c in enumerate(handle.stats.last.branches[0].span_schedule) if c]
    assert computed == [0, 1, 2, 4, 9, 14]
