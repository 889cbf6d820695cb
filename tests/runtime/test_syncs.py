"""Host syncs per transformer call, counted on the CPU (`cachekit.testing.SyncCounter`): what would
make the host wait for the GPU. Schedule-only strategies make none with any estimator; data-dependent
ones (reading the probe, the latent, the output or the first blocks' residual) make at most one,
the read of their decision's signal. Real diffusers pipelines with CFG as two calls, two
generations each: the first of a handle included."""

from __future__ import annotations

import pytest
from helpers import data_dependent

import cachekit
from cachekit.registry import get_estimator, get_strategy, list_estimators, list_strategies, make_config
from cachekit.testing import SyncCounter, run_flux, run_wan, tiny_flux_pipeline, tiny_wan_pipeline

BUILT_IN_ESTIMATORS = [
    name
    for name in list_estimators()
    if get_estimator(name).__module__.startswith("cachekit.") and not get_estimator(name).predictions_only
]
PIPELINES = {"flux": (tiny_flux_pipeline, run_flux), "wan": (tiny_wan_pipeline, run_wan)}


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def pipeline(request):
    make, run = PIPELINES[request.param]
    return make(), run


@pytest.mark.parametrize("estimator", BUILT_IN_ESTIMATORS)
@pytest.mark.parametrize("strategy", list_strategies())
def test_host_syncs_per_call(pipeline, strategy, estimator):
    pipe, run = pipeline
    examples = get_strategy(strategy).example_configs()
    if examples is None:
        pytest.skip(f"{strategy} has no example configs")
    config = make_config({**examples.reuses.model_dump(), "estimator": {"kind": estimator}})
    with SyncCounter(pipe.transformer) as bare:
        run(pipe, steps=6)
    with cachekit.apply(pipe, config) as handle, SyncCounter(pipe.transformer) as counter:
        run(pipe, steps=6)
        run(pipe, steps=6)
    assert sum(bare.per_call) == 0  # the model's own code makes none: what is counted is cachekit's
    reused = sum(
        branch.sites["span" if "span" in branch.sites else next(iter(branch.sites))].reused
        for branch in handle.stats.last.branches.values()
    )
    assert reused > 0  # the counts are of a strategy that does skip work
    if data_dependent(strategy):
        assert max(counter.per_call) == 1, counter.per_call
    else:
        assert counter.per_call == [0] * len(counter.per_call)


@pytest.mark.parametrize("estimator", ["copy", "fastercache"])
def test_the_branch_level_makes_no_host_sync(estimator):
    """It decides from the step alone and produces the second branch on the device."""
    pipe = tiny_wan_pipeline()
    config = make_config(
        {"strategy": "uniform", "interval": 2, "branches": {"interval": 2, "window": [-1, 900], "estimator": estimator}}
    )
    with cachekit.apply(pipe, config) as handle, SyncCounter(pipe.transformer) as counter:
        run_wan(pipe, steps=6)
    assert handle.stats.last.branches[1].produced > 0
    assert counter.per_call == [0] * len(counter.per_call)
