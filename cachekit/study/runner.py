"""Run a study: every cell under one protocol, each result stored as soon as it is known.

Per (model, seed, condition) the uncached cell runs first and is the reference. Every cell
generates from the same initial latents (fingerprinted in the results), warms up, then is timed
over `repeats` generations (device-synchronised; the median is reported). What ran is counted
from the outside for every method alike (`cachekit.counting`), cachekit's and diffusers' own.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
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
from cachekit.metrics import quality
from cachekit.peers import apply_peer
from cachekit.registry import resolve_adapter
from cachekit.schemas import PolicyConfig
from cachekit.schemas.peers import PeerConfig
from cachekit.schemas.study import StudySpec
from cachekit.stats import GenerationStats
from cachekit.study.models import StudyModel, load_model
from cachekit.study.plan import Cell, Setting, StudySpecError, plan
from cachekit.study.store import ResultStore


@dataclass(frozen=True)
class Costs:
    """Estimated FLOPs of one uncached transformer call and of each block and attention/MLP
    module in it, measured once per model with torch's FLOP counter."""

    call: float
    modules: dict[torch.nn.Module, float]


def run_study(spec: StudySpec, db: str | Path, fresh: bool = False, progress: bool = True) -> Path:
    """Run every cell of `spec` not yet in `db` (all of them with `fresh`); returns the db path."""
    cells = plan(spec).cells  # validates everything before any model loads
    store = ResultStore(db)
    try:
        if fresh:
            store.clear(spec.name)
        store.check_protocol(spec.name, protocol(spec))
        done = store.finished(spec.name)
        todo = [cell for cell in cells if (cell.model, cell.setting.key, cell.seed, cell.condition) not in done]
        with tqdm(total=len(cells), initial=len(cells) - len(todo), unit="cell", disable=not progress) as bar:
            for name in spec.models:
                model_cells = [cell for cell in todo if cell.model == name]
                if not model_cells:
                    continue
                model = load_model(name, spec)
                check_settings(model, {cell.setting for cell in model_cells})
                costs = measure_costs(model, model_cells[0])
                for cell in model_cells:
                    bar.set_description(f"{name} seed={cell.seed} {cell.condition!r} {cell.setting.label}")
                    _run_and_store(store, spec, model, cell, costs)
                    bar.update()
    finally:
        store.close()
    return Path(db)


def protocol(spec: StudySpec) -> dict[str, Any]:
    """What a cell's figures depend on besides its model, setting, seed and condition."""
    fields = ("steps", "guidance_scale", "height", "width", "frames", "device", "dtype", "repeats", "warmup")
    return spec.model_dump(mode="json", include=set(fields))


def check_settings(model: StudyModel, settings: set[Setting]) -> None:
    """Apply and remove every setting on the loaded model, so one that cannot run on it (no preset
    fits, a point it lacks) is named before the first cell, not hours in."""
    for setting in sorted(settings, key=lambda s: s.key):
        if setting.config is None:
            continue
        try:
            apply_setting(model, setting.config).remove()
        except (CachekitError, ValueError, TypeError) as error:
            raise StudySpecError(f"{setting.label} cannot run on {model.name}: {error}") from None


def apply_setting(model: StudyModel, config: PolicyConfig | PeerConfig) -> Any:
    """A cachekit policy through `cachekit.apply`, a diffusers method through its own hooks."""
    if isinstance(config, PolicyConfig):
        return cachekit.apply(model.target, config)
    return apply_peer(model.target, config)


def _run_and_store(store: ResultStore, spec: StudySpec, model: StudyModel, cell: Cell, costs: Costs) -> None:
    output, row = run_cell(spec, model, cell, costs)
    key: dict[str, Any] = {"study": spec.name, "model": cell.model, "setting": cell.setting.key}
    key |= {"seed": cell.seed, "condition": cell.condition}
    uncached = cell.setting.config is None
    if uncached:
        reference, reference_latency = output, row["latency_s"]
    else:
        reference, reference_latency = store.reference(spec.name, cell.model, cell.seed, cell.condition)
    measured = quality(output, reference)
    row |= {
        "speedup": reference_latency / row["latency_s"],
        "psnr": measured.psnr,
        "ssim": measured.ssim,
        "ms_ssim": measured.ms_ssim,
        "lpips": measured.lpips,
        "notes": row["notes"] + measured.notes,
    }
    store.add({**key, **row}, reference=output if uncached else None)


def run_cell(spec: StudySpec, model: StudyModel, cell: Cell, costs: Costs) -> tuple[torch.Tensor, dict[str, Any]]:
    """Generate under the cell's policy: warm-up, then timed repeats; returns the output and the row."""
    transformer = model.transformer
    counter = WorkCounter(transformer, resolve_adapter(transformer)(transformer), costs.modules)  # before any hook
    config = cell.setting.config
    handle = apply_setting(model, config) if config is not None else None
    first_inputs: list[str] = []

    def watch(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
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
            seconds, output = timed(generate, spec.device)
            latencies.append(seconds)
    finally:
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
    policy's stats (None where there are none: a diffusers method, a policy without a span)."""
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


def measure_costs(model: StudyModel, cell: Cell) -> Costs:
    """Count the FLOPs of an uncached two-step generation, attributed to modules, per call."""
    transformer = model.transformer
    adapter = resolve_adapter(transformer)(transformer)
    prefix = type(transformer).__name__
    names = {id(module): name for name, module in transformer.named_modules()}
    calls = [0]
    hook = transformer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        with FlopCounterMode(display=False) as counter:
            model.generate(cell.seed, cell.condition, steps=2)
    finally:
        hook.remove()
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    modules = [*_point(adapter.blocks), *(site.module for site in _point(adapter.attention_sites))]
    modules += [site.module for site in _point(adapter.mlp_sites)]
    return Costs(
        call=counts.get(prefix, 0) / calls[0],
        modules={module: counts.get(f"{prefix}.{names[id(module)]}", 0) / calls[0] for module in modules},
    )


def _point(read: Callable[[], list[Any]]) -> list[Any]:
    """A point's modules, or none where the adapter does not provide it."""
    try:
        return read()
    except (NotImplementedError, MissingPointError):
        return []


def timed(generate: Callable[[], torch.Tensor], device: str) -> tuple[float, torch.Tensor]:
    """Seconds one generation takes, synchronised with the device (CUDA events on GPU)."""
    if device == "cuda":
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
