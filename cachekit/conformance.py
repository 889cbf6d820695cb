"""The conformance matrix, as pytest tests: every installed adapter x every installed strategy
(with a copy and a Taylor forecast, in float32; with a copy in bfloat16), every installed
estimator, and the branch level with every installed estimator of the difference between CFG
branches.

Each adapter ships a tiny random instance of its model (`Adapter.example()`) and each strategy a
never-reusing and a reusing config (`Strategy.example_configs()`), so a plugin joins the matrix by
being installed (a strategy without example configs fails it). A cell is skipped only for a point or
attention kind the adapter declares missing, with its declared reason. A plugin author runs it
against everything installed beside the plugin, without a checkout of cachekit (pytest and the
``pipelines`` extra needed):

    pytest --pyargs cachekit.conformance            # or -k my_strategy for the plugin's own cells
"""

from __future__ import annotations

import functools

import pytest
import torch

import cachekit
from cachekit import registry
from cachekit.adapter import (
    PROBE,
    PROJECTED_TIMESTEP_EMBEDDING,
    TIMESTEP_EMBEDDING,
    Adapter,
    BlockArgument,
    OutputSite,
    Place,
)
from cachekit.example import ModelExample
from cachekit.testing import RunCounter, module_state


def cells() -> list[tuple[str, str, str]]:
    """(strategy, estimator, dtype) of the matrix, from what is installed: every strategy with a
    copy and with a second-order Taylor forecast in float32, and with a copy in bfloat16 (the
    precision users run: bf16 timesteps, inputs and weights); every other estimator (a plugin's
    included) with a span-level and a module-level strategy."""
    strategies, estimators = sorted(registry.registry().strategies), registry.registry().estimators
    others = [name for name in sorted(estimators) if name not in ("copy", "taylor") and on_a_bare_model(name)]
    return [
        *((strategy, estimator, "float32") for strategy in strategies for estimator in ("copy", "taylor")),
        *((strategy, estimator, "float32") for strategy in ("uniform", "pab") for estimator in others),
        *((strategy, "copy", "bfloat16") for strategy in strategies),
    ]


def on_a_bare_model(estimator: str) -> bool:
    """Whether `estimator` runs on a bare transformer's residuals: not one that takes predictions
    only, nor one that reads the noise levels a pipeline's scheduler gives (those run on the
    pipelines, `test_trajectory_estimators_run_on_the_pipelines`)."""
    found = registry.registry().estimators[estimator]
    return not found.predictions_only and "sigma" not in found.trajectory


ADAPTERS = sorted(registry.registry().adapters)
STRATEGIES = sorted(registry.registry().strategies)
CELLS = cells()
ESTIMATORS = sorted(registry.registry().estimators)
#: Estimators that read the noise levels only a pipeline's scheduler gives.
READ_SIGMA = [name for name in ESTIMATORS if "sigma" in registry.registry().estimators[name].trajectory]
ESTIMATOR_CONFIGS = {"taylor": {"kind": "taylor", "order": 2}}
STEPS = 6


@pytest.fixture(autouse=True)
def _deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@functools.cache
def example(adapter_name: str, dtype: str = "float32") -> ModelExample:
    found = registry.registry().adapters[adapter_name].example()
    if found is None:
        pytest.skip(f"adapter {adapter_name!r} ships no example model")
    assert cachekit.resolve_adapter(found.model).name == adapter_name
    if dtype == "float32":
        return found
    precision = getattr(torch, dtype)

    def cast(value: object) -> object:
        return value.to(precision) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    inputs = found.inputs
    return ModelExample(
        found.model.to(precision),
        found.latents.to(precision),
        lambda latents, t, branch: {key: cast(value) for key, value in inputs(latents, t, branch).items()},
    )


def denoise(model: ModelExample, steps: int = STEPS) -> torch.Tensor:
    return model.denoise(steps)


@functools.cache
def uncached(adapter_name: str, dtype: str) -> torch.Tensor:
    """The example's uncached output, computed once before any strategy touches the model: every
    cell is held to it, so one that leaves the model changed is caught by the cells after it too."""
    return denoise(example(adapter_name, dtype))


def configs(adapter_name: str, strategy_name: str, estimator: str | None = None):
    """The strategy's example configs for this adapter (with `estimator`, else the strategy's
    own); skips with the declared reason if the adapter lacks a point the strategy needs."""
    adapter = registry.registry().adapters[adapter_name]
    strategy_class = registry.registry().strategies[strategy_name]
    pair = strategy_class.example_configs()
    if pair is None:
        pytest.fail(
            f"strategy {strategy_name!r} ships no example configs: give it example_configs() (an ExampleConfigs of a "
            "config that never reuses and one that does), so the matrix can run it on every adapter",
            pytrace=False,
        )
    for config in pair:
        for point in sorted(strategy_class(config).required_points()):
            if not adapter.provides(point):
                pytest.skip(f"{adapter_name} has no {str(point)!r}: {adapter.missing[point]}")
    update: dict[str, object] = {"num_inference_steps": STEPS}
    if estimator is not None:
        update["estimator"] = ESTIMATOR_CONFIGS.get(estimator, {"kind": estimator})
    return [cachekit.make_config({**config.model_dump(), **update}) for config in pair]


@pytest.mark.parametrize(("strategy_name", "estimator", "dtype"), CELLS)
@pytest.mark.parametrize("adapter_name", ADAPTERS)
def test_never_reusing_is_bitwise_exact_and_remove_restores(adapter_name, strategy_name, estimator, dtype):
    never_reuses, _ = configs(adapter_name, strategy_name, estimator)
    model = example(adapter_name, dtype)
    reference = uncached(adapter_name, dtype)
    before = module_state(model.model)

    with cachekit.apply(model.model, never_reuses) as handle:
        cached = denoise(model)
    restored = denoise(model)

    assert torch.equal(cached, reference)
    assert torch.equal(restored, reference)
    assert module_state(model.model) == before
    assert handle.stats.last.num_steps == STEPS
    for branch in handle.stats.last.branches.values():
        assert branch.calls == STEPS
        assert all(counts.reused == 0 for counts in branch.sites.values())


@pytest.mark.parametrize(("strategy_name", "estimator", "dtype"), CELLS)
@pytest.mark.parametrize("adapter_name", ADAPTERS)
def test_reusing_with_cfg_runs_and_counts_match_executions(adapter_name, strategy_name, estimator, dtype):
    _, reuses = configs(adapter_name, strategy_name, estimator)
    model = example(adapter_name, dtype)
    adapter = cachekit.resolve_adapter(model.model)(model.model)
    blocks = adapter.blocks()
    sites = [*adapter.attention_sites(), *adapter.mlp_sites()] if adapter.provides(Place.ATTENTION) else []
    # Under a span strategy a block runs when its attention does (its norm alone may run for the probe).
    strategy = registry.registry().strategies[strategy_name](reuses)
    spans = Place.SPAN in strategy.required_points()
    attention = {
        block: [site.module for site in adapter.attention_sites() if site.block == i] for i, block in enumerate(blocks)
    }
    counter = RunCounter([*blocks, *(site.module for site in sites)], attention if spans and sites else None)
    try:
        with cachekit.apply(model.model, reuses) as handle:
            output = denoise(model)
    finally:
        counter.close()
    block_runs, site_runs = counter.counts[: len(blocks)], counter.counts[len(blocks) :]

    assert output.shape == model.latents.shape
    assert torch.isfinite(output).all()
    stats = handle.stats.last
    assert sorted(stats.branches) == [0, 1]
    totals: dict[str, list[int]] = {}
    for branch in stats.branches.values():
        assert branch.calls == STEPS
        for name, counts in branch.sites.items():
            total = totals.setdefault(name, [0, 0])
            total[0] += counts.computed
            total[1] += counts.reused
    assert sum(reused for _, reused in totals.values()) > 0, f"nothing reused: {totals}"

    calls = 2 * STEPS
    if "span" in totals:
        computed, reused = totals["span"]
        assert computed + reused == calls
        # the blocks the strategy keeps computed run at every call; the others exactly when the span computes
        first, last = strategy.always_computed()
        assert block_runs == [calls] * first + [computed] * (len(blocks) - first - last) + [calls] * last
    else:
        assert block_runs == [calls] * len(blocks)
    for kind in {site.kind.value for site in sites}:
        runs = sum(count for site, count in zip(sites, site_runs, strict=True) if site.kind.value == kind)
        if kind in totals:
            assert runs == totals[kind][0], kind
        elif "span" not in totals:  # a kind the strategy does not decide always runs (some modules twice a call)
            assert runs >= calls * sum(site.kind.value == kind for site in sites), kind


@pytest.mark.parametrize("estimator", [name for name in ESTIMATORS if name not in READ_SIGMA])
@pytest.mark.parametrize("adapter_name", ADAPTERS)
def test_branch_level_produces_the_second_branch_and_runs_no_block_for_it(adapter_name, estimator):
    """Every step computed (uniform, interval 1) and the second branch produced on every odd step:
    those calls run no block, and both branches' counts say so."""
    model = example(adapter_name)
    if registry.registry().estimators[estimator].predictions_only and model.latents.ndim < 4:
        pytest.skip(
            f"{adapter_name} predicts tokens {tuple(model.latents.shape)}, and {estimator!r} takes predictions "
            "laid out (batch, channels, [frames,] height, width)"
        )
    config = cachekit.make_config(
        {
            "strategy": "uniform",
            "interval": 1,
            "num_inference_steps": STEPS,
            "branches": {"interval": 2, "estimator": ESTIMATOR_CONFIGS.get(estimator, {"kind": estimator})},
        }
    )
    blocks = cachekit.resolve_adapter(model.model)(model.model).blocks()
    counter = RunCounter(blocks)
    try:
        with cachekit.apply(model.model, config) as handle:
            output = denoise(model)
    finally:
        counter.close()

    produced = len(range(1, STEPS, 2))
    assert torch.isfinite(output).all()
    assert not torch.equal(output, uncached(adapter_name, "float32"))
    branches = handle.stats.last.branches
    assert [branches[0].produced, branches[1].produced] == [0, produced]
    assert branches[1].sites["span"].computed == STEPS - produced
    assert counter.counts == [2 * STEPS - produced] * len(blocks)


@pytest.mark.parametrize("adapter_name", ADAPTERS)
def test_adapter_provides_every_point_it_does_not_declare_missing(adapter_name):
    adapter_class = registry.registry().adapters[adapter_name]
    model = example(adapter_name)
    adapter = adapter_class(model.model)
    names = dict(model.model.named_modules())
    assert all(reason.strip() for reason in [*adapter.missing.values(), *adapter.missing_attention.values()])

    blocks = adapter.blocks()
    assert blocks and all(any(block is module for module in names.values()) for block in blocks)
    if adapter.provides(Place.SPAN):
        assert [block for block, _ in adapter.span().blocks] == blocks
    for point, sites in [(Place.ATTENTION, adapter.attention_sites), (Place.MLP, adapter.mlp_sites)]:
        if adapter.provides(point):
            found = sites()
            assert found, f"{adapter_name} provides {point} but lists no site"
            assert all(names[site.name] is site.module for site in found)
            assert all(0 <= site.block < len(blocks) for site in found)
            assert all(any(m is site.module for m in blocks[site.block].modules()) for site in found)
    kinds = {site.kind.value for site in adapter.attention_sites()}
    assert not kinds & {kind.value for kind in adapter.missing_attention}
    assert kinds | {kind.value for kind in adapter.missing_attention} >= {"spatial", "temporal", "cross"}, (
        "every attention kind is either present or declared missing with a reason"
    )

    seen = _signals(adapter, model)
    if adapter.provides(PROBE):
        assert seen["probe"].ndim == 3 and torch.isfinite(seen["probe"]).all()  # batch, tokens, channels
    for signal in (TIMESTEP_EMBEDDING, PROJECTED_TIMESTEP_EMBEDDING):
        if adapter.provides(signal):
            assert isinstance(seen[signal], torch.Tensor) and torch.isfinite(seen[signal]).all()
    torch.testing.assert_close(seen["timestep"], torch.tensor(500.0))


def _signals(adapter: Adapter, model: ModelExample) -> dict[str, torch.Tensor]:
    """Read the step, probe and embeddings out of one real call, with plain torch hooks."""
    seen: dict[str, torch.Tensor] = {}
    first = adapter.blocks()[0]
    embeddings = {
        point: read()
        for point, read in [
            (TIMESTEP_EMBEDDING, adapter.timestep_embedding),
            (PROJECTED_TIMESTEP_EMBEDDING, adapter.projected_timestep_embedding),
        ]
        if adapter.provides(point)
    }

    def on_call(_, args, kwargs):
        seen["timestep"] = adapter.timestep(args, kwargs).float().max()

    def on_first_block(_, args, kwargs):
        if adapter.provides(PROBE) and "probe" not in seen:
            seen["probe"] = adapter.probe(args, kwargs)
        for name, site in embeddings.items():
            if isinstance(site, BlockArgument):
                seen.setdefault(name, site.read(args, kwargs))

    handles = [
        model.model.register_forward_pre_hook(on_call, with_kwargs=True),
        first.register_forward_pre_hook(on_first_block, with_kwargs=True),
    ]
    for name, site in embeddings.items():
        if isinstance(site, OutputSite):

            def on_embedding(_, __, output, name=name, site=site):
                seen.setdefault(name, site.read(output))

            handles.append(site.module.register_forward_hook(on_embedding))
    try:
        with torch.no_grad():
            model(model.latents, 500.0)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("adapter_name", ADAPTERS)
def test_reuse_at_a_nearly_identical_call_reproduces_the_computed_output(adapter_name):
    """The span's residuals and the sites' outputs go back exactly where they came from: reused at
    a call a hair's breadth from the computed one, the output barely moves (a residual added to
    the wrong stream, segment or layout would move it by the output's own scale)."""
    model = example(adapter_name)
    adapter = registry.registry().adapters[adapter_name]
    with torch.no_grad():
        expected = model(model.latents, 499.999)
    strategies = []
    if adapter.provides(Place.SPAN):
        strategies.append({"strategy": "uniform", "interval": 2, "num_inference_steps": 4})
    if adapter.provides(Place.ATTENTION):
        every = {"range": 2, "window": (0.0, 1000.0)}
        kinds = {kind: every for kind in ("spatial", "temporal", "cross") if kind not in adapter.missing_attention}
        strategies.append({"strategy": "pab", **kinds})
    assert strategies
    for strategy in strategies:
        with cachekit.apply(model.model, strategy) as handle, torch.no_grad():
            model(model.latents, 500.0)
            reused = model(model.latents, 499.999)
        assert sum(counts.reused for counts in handle.stats.last.branches[0].sites.values()) > 0
        torch.testing.assert_close(reused, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


@pytest.mark.parametrize("strategy_name", STRATEGIES)
@pytest.mark.parametrize("modality", ["image", "video"])
def test_full_pipeline_runs_under_each_strategy(modality, strategy_name):
    """A whole diffusers pipeline (text encoder, scheduler, VAE) per modality, end to end."""
    from cachekit.testing import run_flux, run_wan, tiny_flux_pipeline, tiny_wan_pipeline

    pair = registry.registry().strategies[strategy_name].example_configs()
    if pair is None:
        pytest.fail(
            f"strategy {strategy_name!r} ships no example configs: give it example_configs() (an ExampleConfigs of a "
            "config that never reuses and one that does), so the matrix can run it on every adapter",
            pytrace=False,
        )
    pipe, run = (tiny_flux_pipeline(), run_flux) if modality == "image" else (tiny_wan_pipeline(), run_wan)
    reference = run(pipe, steps=STEPS)
    with cachekit.apply(pipe, pair.never_reuses):
        assert torch.equal(run(pipe, steps=STEPS), reference)
    with cachekit.apply(pipe, pair.reuses) as handle:
        output = run(pipe, steps=STEPS)
    assert output.shape == reference.shape and torch.isfinite(output).all()
    assert sum(counts.reused for b in handle.stats.last.branches.values() for counts in b.sites.values()) > 0


@pytest.mark.parametrize(
    "estimator", [name for name in ESTIMATORS if "sigma" in registry.registry().estimators[name].trajectory]
)
@pytest.mark.parametrize("modality", ["image", "video"])
def test_trajectory_estimators_run_on_the_pipelines(modality, estimator):
    """An estimator reading the noise levels, under a span and a module strategy, on a whole pipeline
    (whose scheduler gives them): never reusing is exact, reusing runs and reuses."""
    from cachekit.testing import run_flux, run_wan, tiny_flux_pipeline, tiny_wan_pipeline

    pipe, run = (tiny_flux_pipeline(), run_flux) if modality == "image" else (tiny_wan_pipeline(), run_wan)
    reference = run(pipe, steps=STEPS)
    for strategy in ("uniform", "pab"):
        examples = registry.registry().strategies[strategy].example_configs()
        assert examples is not None
        never, reuses = (
            cachekit.make_config({**config.model_dump(), "estimator": {"kind": estimator}}) for config in examples
        )
        with cachekit.apply(pipe, never):
            assert torch.equal(run(pipe, steps=STEPS), reference)
        with cachekit.apply(pipe, reuses) as handle:
            output = run(pipe, steps=STEPS)
        assert output.shape == reference.shape and torch.isfinite(output).all()
        assert sum(counts.reused for b in handle.stats.last.branches.values() for counts in b.sites.values()) > 0
    branches = {"strategy": "uniform", "interval": 1, "branches": {"interval": 2, "estimator": estimator}}
    with cachekit.apply(pipe, branches) as handle:
        output = run(pipe, steps=STEPS)
    assert torch.isfinite(output).all() and handle.stats.last.branches[1].produced == len(range(1, STEPS, 2))


@pytest.mark.parametrize("adapter_name", ADAPTERS)
def test_probe_is_the_modulated_input_block_0_attends_to(adapter_name):
    """The oracle: block 0's first attention module is called on exactly the timestep-modulated
    input, so the probe, computed before the block runs, must equal what that module receives."""
    adapter_class = registry.registry().adapters[adapter_name]
    if not adapter_class.provides(PROBE):
        pytest.skip(f"{adapter_name} has no 'probe': {adapter_class.missing[PROBE]}")
    model = example(adapter_name)
    adapter = adapter_class(model.model)
    attention = next(site.module for site in adapter.attention_sites() if site.block == 0)
    seen: dict[str, torch.Tensor] = {}

    def on_block(_, args, kwargs):
        seen.setdefault("probe", adapter.probe(args, kwargs))

    def on_attention(_, args, kwargs):
        seen.setdefault("attended", kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    hooks = [
        adapter.blocks()[0].register_forward_pre_hook(on_block, with_kwargs=True),
        attention.register_forward_pre_hook(on_attention, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            model(model.latents, 500.0)
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(seen["probe"], seen["attended"])
