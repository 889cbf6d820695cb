"""Regression tests for defects found by probing cachekit as a careless user would: each once gave
a silently wrong result or left a model broken."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from helpers import flux_inputs, module_state

import cachekit
from cachekit import registry as registry_module
from cachekit.errors import ConcurrentUseError, StepCountError, UnsupportedModelError
from cachekit.registry import PluginWarning, Registry
from cachekit.schemas import Broadcast, PABConfig, StrategyConfig, UniformConfig
from cachekit.study import load_spec, run_study
from cachekit.study.store import ResultStore, StoreError
from cachekit.testing import run_flux, tiny_flux_pipeline, tiny_flux_transformer


@pytest.mark.slow
def test_the_model_identity_ignores_process_and_copy(tmp_path):
    """A calibrated preset names its model by a config fingerprint: it must not change with the
    process's hash seed (diffusers keeps an unordered list in the config) nor with the folder the
    weights were loaded from."""
    model = tiny_flux_transformer()
    for folder in ("a", "b"):
        model.save_pretrained(tmp_path / folder)
    script = textwrap.dedent(
        """
        import sys
        from diffusers import FluxTransformer2DModel
        import cachekit
        model = FluxTransformer2DModel.from_pretrained(sys.argv[1])
        print(cachekit.resolve_adapter(model)(model).identity())
        """
    )
    identities = {
        subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / folder)],
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
            cwd=tmp_path,  # not the repository root, whose source folder `cachekit/` would shadow the package
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for folder, seed in [("a", "1"), ("a", "2"), ("b", "3"), ("b", "4")]
    }
    assert len(identities) == 1 and identities.pop().startswith("flux:")


def test_a_failed_apply_leaves_the_model_as_found_and_weight_tied_blocks_are_refused():
    model = tiny_flux_transformer()
    model.single_transformer_blocks[1] = model.single_transformer_blocks[0]  # weight-tied
    before = module_state(model)
    with pytest.raises(
        UnsupportedModelError, match=r"the same block \('single_transformer_blocks\.0'\) appears at positions 1 and 2"
    ):
        cachekit.apply(model, UniformConfig(num_inference_steps=4))
    assert module_state(model) == before
    with pytest.raises(UnsupportedModelError):  # and again: nothing was left behind to collide with
        cachekit.apply(model, UniformConfig(num_inference_steps=4))
    assert module_state(model) == before


def test_a_loop_restarted_at_the_same_timestep_is_a_new_generation_where_the_step_count_is_unknown():
    """Interrupted after step 0, then started again on new noise at the same timestep, without
    reset(): the new loop must not reuse the old loop's residual."""
    model = tiny_flux_transformer()
    timesteps = [0.9, 0.7, 0.4]
    config = PABConfig(spatial=Broadcast(range=2, window=(0.0, 1000.0)))

    def loop(seed):
        return [model(**flux_inputs(timestep=t, seed=seed))[0] for t in timesteps]

    with cachekit.apply(model, config) as handle:
        model(**flux_inputs(timestep=0.9, seed=5))  # the interrupted generation's step 0
        restarted = loop(seed=6)
    assert len(handle.stats.generations) == 2
    with cachekit.apply(model, config):
        fresh = loop(seed=6)
    for a, b in zip(restarted, fresh, strict=True):
        assert torch.equal(a, b)


def test_the_same_timestep_on_another_latent_within_a_known_step_count_is_the_next_step():
    """As bf16 timesteps collide: counted as the next step with a warning, never a new generation;
    a restarted loop then runs past the step count and is named there, with the way out."""
    model = tiny_flux_transformer()
    with cachekit.apply(model, UniformConfig(interval=2, num_inference_steps=3)) as handle:
        model(**flux_inputs(timestep=1.0, seed=5))
        with pytest.warns(UserWarning, match=r"steps 0 and 1 were called at the same timestep \(1000\)"):
            model(**flux_inputs(timestep=1.0, seed=6))
        model(**flux_inputs(timestep=0.7, seed=6))
        assert len(handle.stats.generations) == 1
        assert handle.stats.last.branches[0].span_schedule == [True, False, True]
        with pytest.raises(StepCountError, match=r"step 4 .* of a generation of 3 steps: .*handle.reset\(\)"):
            model(**flux_inputs(timestep=0.4, seed=6))


def test_a_transformer_driven_by_a_pipeline_cachekit_does_not_watch_is_named():
    """Applied through one pipeline, run through another with more steps: refused at the first
    call past the watched step count, never cut into generations of the wrong length."""
    first, second = tiny_flux_pipeline(), tiny_flux_pipeline()
    second.transformer = first.transformer
    with cachekit.apply(first, UniformConfig(interval=2)):
        run_flux(first, steps=4)
        with pytest.raises(StepCountError, match=r"step 5 .* of a generation of 4 steps: a pipeline whose scheduler"):
            run_flux(second, steps=8)


def test_two_threads_on_one_transformer_are_refused():
    model = tiny_flux_transformer()
    errors: list[BaseException] = []
    results: list[torch.Tensor] = []
    barrier = threading.Barrier(2)

    def generate(seed):
        try:
            barrier.wait()
            for index in range(6):
                results.append(model(**flux_inputs(timestep=1 - index / 6, seed=seed))[0])
        except BaseException as error:
            errors.append(error)

    with cachekit.apply(model, UniformConfig(interval=2, num_inference_steps=6)):
        threads = [threading.Thread(target=generate, args=(seed,)) for seed in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors, "interleaved generations must not pass silently"
    assert all(isinstance(error, ConcurrentUseError) for error in errors)
    assert "second thread" in str(errors[0]) and "own transformer" in str(errors[0])


def test_built_in_names_win_and_the_plugin_claiming_one_is_named(monkeypatch):
    """A third-party plugin registering 'uniform', found before the built-ins, is the one refused."""
    impostor = importlib.metadata.EntryPoint("aaa-impostor", "impostor_plugin", "cachekit")
    found = [impostor, *importlib.metadata.entry_points(group="cachekit")]
    monkeypatch.setattr(registry_module.importlib.metadata, "entry_points", lambda group: found)
    fresh = Registry()
    with pytest.warns(
        PluginWarning,
        match=r"plugin 'aaa-impostor' registers strategy 'uniform', which plugin 'cachekit.strategies.uniform'",
    ):
        fresh.load_entry_points()
    assert fresh.strategies["uniform"].__module__ == "cachekit.strategies.uniform"
    assert list(fresh.errors) == ["aaa-impostor"]


STUDY = 'models = ["flux-digits"]\nlabels = [1]\nsteps = 4\nrepeats = 1\nwarmup = 0\n'


class NumpyDecisionConfig(StrategyConfig):
    strategy: Literal["numpy_decision"] = "numpy_decision"


def test_a_numpy_bool_decision_runs_through_a_study(tmp_path, register_strategy):
    class NumpyDecision(cachekit.Strategy):
        config_class = NumpyDecisionConfig
        requires = frozenset({cachekit.Place.SPAN})

        def decide_span(self, step, signals, state):
            return np.bool_(step.index % 2 == 0)

    register_strategy(NumpyDecision)
    spec = tmp_path / "spec.toml"
    spec.write_text(STUDY + '[[strategies]]\nstrategy = "numpy_decision"\n')
    db = run_study(load_spec(spec), tmp_path / "r.sqlite", progress=False)
    row = next(r for r in ResultStore(db).rows() if r["strategy"] == "numpy_decision")
    assert json.loads(row["decisions"])["0"]["span"] == [True, False, True, False]


def test_a_changed_protocol_is_refused_not_mixed(tmp_path):
    text = 'name = "p"\n' + STUDY + '[[strategies]]\nstrategy = "uniform"\n'
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    db = run_study(load_spec(spec), tmp_path / "r.sqlite", progress=False)
    spec.write_text(text.replace("steps = 4", "steps = 8"))
    with pytest.raises(
        StoreError, match=r"holds study 'p' measured under another protocol \(flux-digits: steps 4 -> 8\).*--fresh"
    ):
        run_study(load_spec(spec), db, progress=False)
    run_study(load_spec(spec), db, fresh=True, progress=False)
    assert {row["calls"] for row in ResultStore(db).rows("p")} == {16}  # 8 steps x 2 branches, none stale


def test_a_protocol_with_no_cell_measured_under_it_is_replaced_not_held_against_a_corrected_spec(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    store.check_protocol("p", {"flux-digits": {"steps": 4, "device": "cuda:0"}})  # a run that failed before a cell
    store.check_protocol("p", {"flux-digits": {"steps": 4, "device": "cpu"}})
    assert store.protocols() == {"p": {"flux-digits": {"steps": 4, "device": "cpu"}}}
    row = {"study": "p", "model": "flux-digits", "setting": "uncached", "seed": 0, "condition": "1"}
    store.add({**row, "label": "uncached", "strategy": "uncached", "latency_s": 1.0})
    with pytest.raises(StoreError, match=r"flux-digits: device 'cpu' -> 'cuda:0'"):
        store.check_protocol("p", {"flux-digits": {"steps": 4, "device": "cuda:0"}})


def test_a_device_the_machine_lacks_is_refused_before_the_database_is_made(tmp_path, monkeypatch):
    from cachekit.study import StudySpecError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = tmp_path / "spec.toml"
    spec.write_text('name = "p"\ndevice = "cuda"\n' + STUDY + '[[strategies]]\nstrategy = "uniform"\n')
    with pytest.raises(StudySpecError, match=r"device 'cuda': torch sees no CUDA device on this machine"):
        run_study(load_spec(spec), tmp_path / "r.sqlite", progress=False)
    assert not (tmp_path / "r.sqlite").exists()


def test_two_study_processes_on_one_database_finish_every_cell_once(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(
        'models = ["flux-digits"]\nlabels = [1, 2]\nsteps = 6\nrepeats = 1\nwarmup = 0\n'
        '[[strategies]]\nstrategy = "uniform"\nsweep.interval = [2, 3]\n'
    )
    db = tmp_path / "r.sqlite"
    command = [sys.executable, "-m", "cachekit", "study", "run", str(spec), "--db", str(db), "--quiet"]
    processes = [subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
    keys = [(r["setting"], r["seed"], r["condition"]) for r in ResultStore(db).rows()]
    assert len(keys) == len(set(keys)) == 2 * 3


def test_report_refuses_a_missing_database(tmp_path):
    from cachekit.study import write_report

    with pytest.raises(StoreError, match="no results database at"):
        write_report(tmp_path / "none.sqlite")
    assert not Path(tmp_path / "none.sqlite").exists()


@pytest.mark.parametrize("batches", [(2, 1), (1, 2)], ids=["guidance-off", "guidance-on"])
def test_a_batch_that_changes_inside_a_generation_computes_never_broadcasts(batches):
    """Batch 2 for steps 0-2 then 1 (or 1 then 2): a step that would reuse a value kept for
    another batch computes instead, and its output is the uncached one."""
    model = tiny_flux_transformer()
    first, then = batches
    calls = [(first, 1.0), (first, 0.8), (first, 0.6), (then, 0.4), (then, 0.2)]
    reference = [model(**flux_inputs(batch=batch, timestep=t))[0] for batch, t in calls]
    with cachekit.apply(model, UniformConfig(interval=2, num_inference_steps=len(calls))) as handle:
        cached = [model(**flux_inputs(batch=batch, timestep=t))[0] for batch, t in calls]
    assert handle.stats.last.branches[0].span_schedule == [True, False, True, True, True]  # step 3 computed
    assert cached[3].shape == reference[3].shape and torch.equal(cached[3], reference[3])


class Estimates:
    """Test estimators that hand back something that cannot stand for the value they were given."""

    @staticmethod
    def of(name, wrong):
        from cachekit.estimators.copy import CopyEstimator
        from cachekit.schemas.estimators import EstimatorConfig

        config = type(
            f"{name.title()}Config", (EstimatorConfig,), {"__annotations__": {"kind": Literal[name]}, "kind": name}
        )
        return type(f"{name.title()}Estimator", (CopyEstimator,), {
            "config_class": config,
            "estimate": lambda self, state, step: wrong(state.value),
        })  # fmt: skip


@pytest.mark.parametrize(
    ("name", "wrong", "described"),
    [
        ("scalar", lambda value: value.mean(), r"a tensor of shape \(\), float32, on cpu"),
        ("wide", lambda value: value.double(), r"shape \(1, 16, 32\), float64, on cpu"),
        ("meta", lambda value: value.to("meta"), r"on meta"),
        ("nothing", lambda value: None, r"NoneType None"),
    ],
)
def test_an_estimate_that_cannot_stand_for_the_value_is_named(fresh_registry, name, wrong, described):
    from cachekit.errors import EstimatorError
    from cachekit.hookspecs import hookimpl

    estimator = Estimates.of(name, wrong)

    class Plugin:
        @hookimpl
        def cachekit_register_estimators(self, register):
            register(estimator)

    cachekit.register_plugin(Plugin(), f"test-{name}")
    model = tiny_flux_transformer()
    config = UniformConfig(interval=2, num_inference_steps=3, estimator={"kind": name})
    with cachekit.apply(model, config), pytest.raises(EstimatorError) as error:
        for t in (1.0, 0.6, 0.2):
            model(**flux_inputs(timestep=t))
    message = str(error.value)
    assert f"estimator {name!r} returned" in message and "recorded as a tensor of shape (1, 16, 32)" in message
    assert re.search(described, message) and "must have the recorded shape, dtype and device" in message


def test_easycache_computes_after_a_nan_instead_of_handing_it_out():
    from cachekit.schemas import EasyCacheConfig

    model = tiny_flux_transformer()
    steps = 8
    config = EasyCacheConfig(warmup_steps=2, threshold=1000.0, num_inference_steps=steps)
    with cachekit.apply(model, config) as handle:
        outputs = []
        for index in range(steps):
            inputs = flux_inputs(timestep=1 - index / steps)
            if index == 4:
                inputs["hidden_states"] = torch.full_like(inputs["hidden_states"], float("nan"))
            outputs.append(model(**inputs)[0])
    schedule = handle.stats.last.branches[0].span_schedule
    assert schedule[4] and all(schedule[5:])  # the NaN's step computes; so do the ones its NaN rate follows
    assert all(torch.isfinite(output).all() for index, output in enumerate(outputs) if index != 4)


def test_diffusers_cache_enabled_after_apply_is_refused_at_the_next_call():
    from diffusers import FirstBlockCacheConfig

    model = tiny_flux_transformer()
    with cachekit.apply(model, UniformConfig(num_inference_steps=4)) as handle:
        model(**flux_inputs(timestep=1.0))
        model.enable_cache(FirstBlockCacheConfig(threshold=0.5))
        with pytest.raises(
            cachekit.errors.AlreadyAttachedError,
            match=r"had diffusers' FirstBlockCacheConfig enabled \(enable_cache\) after cachekit\.apply: two caches "
            r"would skip on top of each other; call its disable_cache\(\) to keep cachekit's",
        ):
            model(**flux_inputs(timestep=0.75))
        model.disable_cache()
        model(**flux_inputs(timestep=0.75))  # cachekit's alone again
    assert handle.stats.last.branches[0].calls == 2


@pytest.mark.parametrize("failing_step", [0, 2])
def test_a_step_retried_after_a_block_raised_runs_as_if_the_failure_never_happened(failing_step):
    """Out of memory in a block, then the same step again: the failed call counts for nothing."""
    model = tiny_flux_transformer()
    block = model.transformer_blocks[0]
    forward, fail = block.forward, {"now": False}

    def failing(*args, **kwargs):
        if fail["now"]:
            fail["now"] = False
            raise RuntimeError("CUDA out of memory (simulated)")
        return forward(*args, **kwargs)

    block.forward = failing
    timesteps = [1.0, 0.75, 0.5, 0.25]
    with cachekit.apply(model, UniformConfig(num_inference_steps=4)) as handle:
        outputs = []
        for index, timestep in enumerate(timesteps):
            if index == failing_step:
                fail["now"] = True
                with pytest.raises(RuntimeError, match="out of memory"):
                    model(**flux_inputs(timestep=timestep))
            outputs.append(model(**flux_inputs(timestep=timestep))[0])
    with cachekit.apply(model, UniformConfig(num_inference_steps=4)) as clean:
        expected = [model(**flux_inputs(timestep=timestep))[0] for timestep in timesteps]
    assert all(torch.equal(output, reference) for output, reference in zip(outputs, expected, strict=True))
    assert len(handle.stats.generations) == 1 and str(handle.stats.last) == str(clean.stats.last)


@pytest.mark.parametrize("name", cachekit.list_strategies())
def test_a_meta_device_forward_is_named_and_leaves_the_strategy_as_it_was(name):
    """Meta tensors hold no values to decide from: the call is refused by name (not a raw
    `Tensor.item()` error from deep inside), and the strategy runs on the next real call."""
    examples = cachekit.get_strategy(name).example_configs()
    model = tiny_flux_transformer()
    meta = {key: value.to("meta") if torch.is_tensor(value) else value for key, value in flux_inputs().items()}
    with cachekit.apply(model, examples.reuses.model_copy(update={"num_inference_steps": 4})) as handle:
        with pytest.raises(
            UnsupportedModelError, match=r"FluxTransformer2DModel was called on the meta device, whose tensors hold no"
        ):
            model.to("meta")(**meta)
        model.to_empty(device="cpu")
        model(**flux_inputs(timestep=1.0))
    assert handle.stats.last.branches[0].calls == 1
