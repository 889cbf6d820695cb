"""Attach each built-in cache strategy to a diffusers pipeline, generate, and read what it did.

Runs offline on a tiny Flux pipeline with random weights: the numbers show the plumbing
(what was computed and reused, wall time), not image quality.
"""

import time

import torch

import cachekit
from cachekit.schemas import FBCacheConfig, PABConfig, TeaCacheConfig, UniformConfig
from cachekit.testing import run_flux, tiny_flux_pipeline

STEPS = 20
pipe = tiny_flux_pipeline()
run_flux(pipe, steps=2)  # warm-up

start = time.perf_counter()
reference = run_flux(pipe, steps=STEPS)
print(f"strategies: {cachekit.list_strategies()}  estimators: {cachekit.list_estimators()}")
print(f"adapters: {cachekit.list_adapters()}")
print(f"uncached: {time.perf_counter() - start:.3f} s for {STEPS} steps with true CFG")

strategies = [
    UniformConfig(interval=3),
    TeaCacheConfig(preset="flux-dev", rel_l1_thresh=0.4),
    # when: TeaCache's rule; how: a second-order Taylor forecast of the skipped residual
    TeaCacheConfig(preset="flux-dev", rel_l1_thresh=0.4, estimator={"kind": "taylor", "order": 2}),
    FBCacheConfig(threshold=0.2),
    PABConfig(),
]
for config in strategies:
    with cachekit.apply(pipe, config) as handle:
        start = time.perf_counter()
        cached = run_flux(pipe, steps=STEPS)
        seconds = time.perf_counter() - start
    print(f"\n{config!r}\n  {seconds:.3f} s, max |cached - uncached| = {(cached - reference).abs().max().item():.4f}")
    print(handle.stats)  # per CFG branch: computed and reused per site, the schedule, the preset taken

assert torch.equal(run_flux(pipe, steps=STEPS), reference), "removing a strategy must restore the pipeline"
print("\nafter removal: output identical to the uncached pipeline")
