"""SeaCache: decides from the spectrally filtered latent; forced ends, capped skips."""

from __future__ import annotations

import cachekit
from cachekit.schemas import SeaCacheConfig
from cachekit.testbed import load


def test_seacache_forces_its_ends_and_caps_skips_in_a_row():
    pipe = load("flux-digits")
    with cachekit.apply(pipe, SeaCacheConfig(threshold=1000.0, retention_steps=2, cache_end_steps=3)) as handle:
        pipe([4], num_inference_steps=12)
    skips = [True, True, False, False, True, False, False, True, False, True, True, True]
    assert handle.stats.last.branches[0].span_schedule == skips  # at most 2 skips in a row (the default cap)
