"""Run a study: every cell under one protocol, each result stored as soon as it is known.

Per (model, seed, condition) the uncached cell runs first and is the reference. Every cell
generates from the same initial latents (fingerprinted in the results), warms up, then is timed
over `repeats` generations (device-synchronised; every latency is kept, the median reported).
What ran is counted from the outside for every method alike (`cachekit.counting`), cachekit's
and diffusers' own. Every setting is tried on every model before the first cell runs, so one
that cannot run on a model is named in seconds, not hours in.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import cachekit
from cachekit.counting import Work, WorkCounter
from cachekit.errors import CachekitError, MissingPointError
from cachekit.metric import Sample
from cachekit.registry import resolve_adapter
from cachekit.schemas.configs import StrategyConfig
from cachekit.schemas.diffusers_methods import DIFFUSERS_METHODS, DiffusersMethodConfig
from cachekit.schemas.study import StudySpec
from cachekit.stats import GenerationStats
from cachekit.study.budgets import needs_tuning, tune_budgets, tuned_file, with_tuned, without_budget
from cachekit.study.diffusers_methods import apply_diffusers_method
from cachekit.study.metrics import Metrics
from cachekit.study.models import StudyModel, load_model, on_device, skeleton
from cachekit.study.plan import Cell, Plan, Setting, StudySpecError, check_device, plan
from cachekit.study.store import Merged, ResultStore, StoreError, protocol_differences
from cachekit.study.workers import Workers, join, use_threads


@dataclass(frozen=True)
class Costs:
    """Estimated FLOPs of one uncached transformer call and of each block and attention/MLP
    module in it, measured once per model with torch's FLOP counter."""

    call: float
    modules: dict[torch.nn.Module, float]
    calls_per_step: float  # transformer calls per denoising step (2 with CFG as two calls)


def run_study(
    spec: StudySpec, db: str | Path, fresh: bool = False, progress: bool = True, db_per_process: bool = False
) -> Path:
    """Run every cell of `spec` not yet in `db` (all of them with `fresh`); returns the db path.

    Under `torchrun` each process runs its share (`cachekit.study.workers`); with `db_per_process`
    each writes a database of its own beside `db` (`results.rank1.sqlite`, ...), merged into `db`
    once all are done."""
    the_plan = plan(spec)  # validates everything before any model loads
    for entry in spec.models:
        check_device(spec.generation(entry.name).device)  # before the database is made
    use_threads(spec, [entry.name for entry in spec.models])
    workers = join(spec)
    try:
        checked = check_before_loading(spec, the_plan)
        own = process_db(db, workers.data_rank) if db_per_process and not workers.alone else Path(db)
        store = ResultStore(own) if workers.writes else None
        try:
            if store is not None and fresh and (db_per_process or workers.rank == 0):
                store.clear(spec.name)
            workers.wait_for_all()  # nobody writes before a --fresh database is cleared
            if store is not None:
                store.check_protocol(spec.name, protocol(spec))
                store.record_run(spec.name, spec.model_dump(mode="json"), len(the_plan.cells), environment(spec))
            tuned = tuned_file(db if workers.alone else process_db(db, workers.rank))
            _run_share(spec, store, the_plan.cells, workers, progress, the_plan.metrics, checked, tuned)
        finally:
            if store is not None:
                store.close()
        workers.wait_for_all()
        if db_per_process and not workers.alone and workers.rank == 0:
            merge(
                db,
                [process_db(db, rank) for rank in range(workers.data_size)],
                fresh_study=spec.name if fresh else None,
            )
    finally:
        workers.leave()
    return Path(db)


def process_db(db: str | Path, rank: int) -> Path:
    """Where process `rank` of a study writes when each process has its own database."""
    db = Path(db)
    return db.with_name(f"{db.stem}.rank{rank}{db.suffix}")


def merge(db: str | Path, sources: list[Path], fresh_study: str | None = None) -> dict[Path, Merged]:
    """Gather the cells of `sources` into `db` (the first result of a cell stays). Every source's
    protocols are checked against `db`'s and each other's before anything is merged."""
    missing = [str(source) for source in sources if not Path(source).is_file()]
    if missing:
        raise StoreError(f"nothing to merge from {', '.join(missing)}: no such database")
    resolved = [Path(source).resolve() for source in sources]
    if Path(db).resolve() in resolved:
        raise StoreError(f"cannot merge {db} into itself: give the databases to take cells from, other than {db}")
    twice = sorted({str(source) for source, path in zip(sources, resolved, strict=True) if resolved.count(path) > 1})
    if twice:
        raise StoreError(f"{', '.join(twice)} given more than once: give each database to merge once")
    target = ResultStore(db)
    opened: list[ResultStore] = []
    try:
        if fresh_study is not None:
            target.clear(fresh_study)
        opened = [ResultStore(source, create=False) for source in sources]
        _check_protocols(target, sources, opened)
        return {Path(source): target.merge(other) for source, other in zip(sources, opened, strict=True)}
    finally:
        for store in [target, *opened]:
            store.close()


def _check_protocols(target: ResultStore, sources: list[Path], opened: list[ResultStore]) -> None:
    """Refuse a merge whose sources measured a study under another protocol than `target` or
    than each other, before any cell moves."""
    seen = {study: (str(target.path), protocol) for study, protocol in target.protocols().items()}
    for source, store in zip(sources, opened, strict=True):
        for study, protocol in store.protocols().items():
            where, recorded = seen.get(study, (str(source), {}))
            differences = protocol_differences(recorded, protocol)
            if differences:
                raise StoreError(
                    f"{source} measured study {study!r} under another protocol than {where} ({differences}): "
                    "nothing was merged; merge only databases of one protocol (merge the others into another "
                    "database)"
                )
            seen[study] = (where, {**recorded, **protocol})


def _run_share(
    spec: StudySpec,
    store: ResultStore | None,
    cells: list[Cell],
    workers: Workers,
    progress: bool,
    metrics: Metrics,
    checked: set[str],
    tuned: Path,
) -> None:
    """Run this process's share of the cells; skip those done before, or meanwhile by another writer.
    The settings of a model not `checked` before loading are tried once it has loaded; its budget
    entries are tuned on the calibration cells (kept in `tuned`) before its first cell."""
    groups = list(dict.fromkeys((cell.model, cell.seed, cell.condition) for cell in cells))
    mine = set(workers.share(groups))
    done = workers.agree(store.finished(spec.name) if store is not None else set())
    todo = [
        cell
        for cell in cells
        if (cell.model, cell.seed, cell.condition) in mine
        and (cell.model, cell.setting.key, cell.seed, cell.condition) not in done
    ]
    shown = progress and workers.rank == 0
    share = sum((cell.model, cell.seed, cell.condition) in mine for cell in cells)
    with tqdm(total=share, initial=share - len(todo), unit="cell", disable=not shown) as bar:
        for entry in spec.models:
            model_cells = [cell for cell in todo if cell.model == entry.name]
            if not model_cells:
                continue
            generation = spec.generation(entry.name)
            with on_device(generation.device):
                model = load_model(entry.name, generation, frozenset(entry.overrides()))
                workers.parallelize(model.transformer)
                if entry.name not in checked:
                    settings = list({cell.setting.key: cell.setting for cell in model_cells}.values())
                    check_settings(entry.name, model.target, settings, spec.generation(entry.name).steps)
                budgeted = {c.setting.key: c.setting.config for c in model_cells if needs_tuning(c.setting.config)}
                if budgeted:
                    bar.set_description(f"{entry.name}: tuning {len(budgeted)} budget settings on calibration cells")
                    unmet = tune_budgets(model, budgeted, spec, tuned)
                    model_cells = [
                        _with_tuned(cell, tuned, model) for cell in model_cells if cell.setting.key not in unmet
                    ]
                    if not model_cells:
                        continue
                costs = measure_costs(model, model_cells[0], workers)
                for cell in model_cells:
                    bar.set_description(f"{entry.name} seed={cell.seed} {cell.condition!r} {cell.setting.label}")
                    key = (spec.name, cell.model, cell.setting.key, cell.seed, cell.condition)
                    if not workers.agree(store is not None and store.has(*key)):
                        _run_and_store(store, spec, model, cell, costs, workers.name, metrics, shown)
                    bar.update()


def _with_tuned(cell: Cell, tuned: Path, model: StudyModel) -> Cell:
    setting = dataclasses.replace(cell.setting, config=with_tuned(cell.setting.config, tuned, model))
    return dataclasses.replace(cell, setting=setting)


def protocol(spec: StudySpec) -> dict[str, dict[str, Any]]:
    """Per model, what its cells' figures depend on besides the setting, seed and condition."""
    protocols = {}
    for entry in spec.models:
        generation = spec.generation(entry.name)
        fields = generation.model_dump(mode="json", exclude={"seeds", "labels", "prompts", "fps", "threads"})
        if generation.device == "cpu":  # the threads the CPU computed with (set by `use_threads`)
            fields["threads"] = torch.get_num_threads()
        protocols[entry.name] = {**fields, "repeats": spec.repeats, "warmup": spec.warmup}
    return protocols


def environment(spec: StudySpec) -> dict[str, str]:
    """Where a run measures: the device and the versions that decide the figures."""
    devices = sorted({spec.generation(entry.name).device for entry in spec.models})
    versions = {}
    for package in ("torch", "diffusers", "dit-cachekit", "transformers"):
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        versions[package.removeprefix("dit-")] = version
    return {
        "device": "; ".join(_device_name(device) for device in devices),
        **versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device}: {torch.cuda.get_device_name(torch.device(device))}"
    return f"{device}: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def check_before_loading(spec: StudySpec, the_plan: Plan) -> set[str]:
    """Try every setting on every model whose structure can be built without its weights (on the
    meta device), so a setting that cannot run on the second model is named before the first cell;
    returns the models checked."""
    checked = set()
    for entry in spec.models:
        target = skeleton(entry.name)
        if target is not None:
            check_settings(entry.name, target, the_plan.settings, spec.generation(entry.name).steps)
            checked.add(entry.name)
    return checked


def check_settings(name: str, target: Any, settings: list[Setting], steps: int) -> None:
    """Apply and remove every setting on model `name` (loaded, or its skeleton) as for a
    generation of `steps` steps, so one that cannot run on it (no preset fits, a point it lacks,
    per-step values for another step count) is named before its first cell, not hours in."""
    for setting in settings:
        config = without_budget(setting.config, steps)  # a budget entry is tuned once its model has loaded
        if config is None:
            continue
        if isinstance(config, StrategyConfig) and config.num_inference_steps is None:
            config = config.model_copy(update={"num_inference_steps": steps})
        try:
            apply_setting(target, config).remove()
        except (CachekitError, ValueError, TypeError) as error:
            raise StudySpecError(f"{setting.label} cannot run on {name}: {error}") from None


def apply_setting(target: Any, config: StrategyConfig | DiffusersMethodConfig | dict[str, Any]) -> Any:
    """A cachekit strategy through `cachekit.apply`, a diffusers method through its own hooks
    (a config, or a dict with its ``strategy``)."""
    if isinstance(config, DiffusersMethodConfig) or (
        isinstance(config, dict) and config["strategy"] in DIFFUSERS_METHODS
    ):
        return apply_diffusers_method(target, config)
    return cachekit.apply(target, config)


def _run_and_store(
    store: ResultStore | None,
    spec: StudySpec,
    model: StudyModel,
    cell: Cell,
    costs: Costs,
    process: str,
    metrics: Metrics,
    progress: bool = False,
) -> None:
    output, row = run_cell(spec, model, cell, costs, progress)
    if store is None:  # another process of this context group records it
        return
    key: dict[str, Any] = {"study": spec.name, "model": cell.model, "setting": cell.setting.key}
    key |= {"seed": cell.seed, "condition": cell.condition}
    if cell.setting.config is None:
        reference, reference_latency = output, row["latency_s"]
    else:
        reference, reference_latency = store.reference(spec.name, cell.model, cell.seed, cell.condition)
    values, notes = metrics.score(Sample(output.detach().cpu(), reference.detach().cpu(), cell.condition))
    row |= {
        "speedup": reference_latency / row["latency_s"],
        "metrics": values,
        "notes": row["notes"] + notes,
        "process": process,
    }
    store.add({**key, **row}, output, fps=model.spec.fps, tensor=spec.save_tensors)


def run_cell(
    spec: StudySpec, model: StudyModel, cell: Cell, costs: Costs, progress: bool = False
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Generate under the cell's strategy: warm-up, then timed repeats; returns the output and the
    row. `progress`: a bar over the cell's transformer calls, with its ETA."""
    transformer = model.transformer
    counter = WorkCounter(transformer, resolve_adapter(transformer)(transformer), costs.modules)  # before any hook
    config = cell.setting.config
    handle = apply_setting(model.target, config) if config is not None else None
    first_inputs: list[str] = []
    generations = spec.warmup + spec.repeats
    calls = tqdm(
        total=round(generations * model.spec.steps * costs.calls_per_step),
        desc="  generations",
        unit="call",
        leave=False,
        disable=not progress,
    )

    def watch(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.update()
        if not first_inputs:
            first_inputs.append(_fingerprint(kwargs.get("hidden_states", args[0] if args else None)))

    hook = transformer.register_forward_pre_hook(watch, with_kwargs=True)
    try:
        generate = lambda: model.generate(cell.seed, cell.condition)  # noqa: E731
        for _ in range(spec.warmup):
            generate()
        latencies, output = [], None
        for _ in range(spec.repeats):
            first_inputs.clear()
            counter.reset()
            seconds, output = timed(generate, model.spec.device)
            latencies.append(seconds)
    finally:
        calls.close()
        hook.remove()
        if handle is not None:
            handle.remove()
        counter.close()
    assert output is not None
    last = handle.stats.last if handle is not None and handle.stats is not None else None
    row = {
        "label": cell.setting.label,
        "method": cell.setting.method,
        "strategy": config.strategy if config else "uncached",
        "latency_s": statistics.median(latencies),
        "latencies_s": latencies,
        "latents_sha": first_inputs[0],
        "notes": [],
        **_counts(config is None, last, counter.work, costs),
    }
    if handle is not None and last is not None:
        row["decisions"] = {
            branch: {"span": stats.span_schedule, "modules": stats.module_schedule}
            for branch, stats in last.branches.items()
        }
        row["stats"] = {"generation": dataclasses.asdict(last), "info": handle.stats.info}
    row["finished_at"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return output, row


def _counts(uncached: bool, last: GenerationStats | None, work: Work, costs: Costs) -> dict[str, Any]:
    """What ran (counted from the outside) and FLOPs; the calls that computed the span, from the
    strategy's stats (None where there are none: a diffusers method, a strategy without a span)."""
    span = [branch.sites["span"] for branch in last.branches.values() if "span" in branch.sites] if last else []
    attention = work.calls * work.attention_sites
    return {
        "calls": work.calls,
        "computed_calls": work.calls if uncached else sum(c.computed for c in span) if span else None,
        "reused_calls": 0 if uncached else sum(c.reused for c in span) if span else None,
        "block_executions": work.block_runs,
        "block_share": work.block_share,
        "attention_computed": work.attention_runs,
        "attention_reused": attention - work.attention_runs,
        "flops": work.calls * costs.call - work.flops_skipped,
        "flops_saved": work.flops_skipped,
    }


def measure_costs(model: StudyModel, cell: Cell, workers: Workers | None = None) -> Costs:
    """Count the FLOPs of an uncached generation of a few steps, attributed to modules, per call
    (those of the whole context group where a generation is split over several processes)."""
    steps = 2
    transformer = model.transformer
    adapter = resolve_adapter(transformer)(transformer)
    prefix = type(transformer).__name__
    names = {id(module): name for name, module in transformer.named_modules()}
    calls = [0]
    hook = transformer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        with FlopCounterMode(display=False) as counter:
            model.generate(cell.seed, cell.condition, steps=steps)
    finally:
        hook.remove()
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    modules = [*_point(adapter.blocks), *(site.module for site in _point(adapter.attention_sites))]
    modules += [site.module for site in _point(adapter.mlp_sites)]
    flops = [counts.get(prefix, 0), *(counts.get(f"{prefix}.{names[id(module)]}", 0) for module in modules)]
    if workers is not None:
        flops = workers.context_sum(flops)
    return Costs(
        call=flops[0] / calls[0],
        modules={module: value / calls[0] for module, value in zip(modules, flops[1:], strict=True)},
        calls_per_step=calls[0] / steps,
    )


def _point(read: Callable[[], list[Any]]) -> list[Any]:
    """A point's modules, or none where the adapter does not provide it."""
    try:
        return read()
    except (NotImplementedError, MissingPointError):
        return []


def timed(generate: Callable[[], torch.Tensor], device: str) -> tuple[float, torch.Tensor]:
    """Seconds one generation takes, synchronised with the device (CUDA events on GPU; the
    device must be the current one, as `on_device` makes it)."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        output = generate()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000, output
    began = time.perf_counter()
    output = generate()
    return time.perf_counter() - began, output


def _fingerprint(tensor: Any) -> str:
    if not isinstance(tensor, torch.Tensor):
        return "unknown"
    return hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
