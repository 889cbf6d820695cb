"""Attach a cache policy to a diffusers pipeline, generate, and read what it did.

Runs offline on a tiny Flux pipeline with random weights: the numbers show the plumbing
(calls computed and reused, wall time), not image quality.
"""

import time

import torch

import cachekit
from cachekit.schemas import UniformConfig
from cachekit.testing import run_flux, tiny_flux_pipeline

pipe = tiny_flux_pipeline()
run_flux(pipe, steps=2)  # warm-up

start = time.perf_counter()
reference = run_flux(pipe, steps=20)
uncached_s = time.perf_counter() - start

with cachekit.apply(pipe, UniformConfig(interval=3)) as handle:
    start = time.perf_counter()
    cached = run_flux(pipe, steps=20)
    cached_s = time.perf_counter() - start

print(f"strategies: {cachekit.list_strategies()}  adapters: {cachekit.list_adapters()}")
for branch, stats in handle.stats.last.branches.items():
    span = stats.sites["span"]
    schedule = "".join("C" if computed else "." for computed in stats.span_schedule)
    print(f"branch {branch}: {stats.calls} calls, span computed {span.computed}, reused {span.reused}  {schedule}")
print(f"uncached {uncached_s:.3f} s, uniform(interval=3) {cached_s:.3f} s")
print(f"max |cached - uncached| = {(cached - reference).abs().max().item():.4f}")
assert torch.equal(run_flux(pipe, steps=20), reference), "removing the policy must restore the pipeline"
print("after remove: output identical to the uncached pipeline")
