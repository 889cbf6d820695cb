"""Run a study: every cell under one protocol, each result stored as soon as it is known.

Per (model, seed, condition) the uncached cell runs first and is the reference. Every cell
generates from the same initial latents (fingerprinted in the results), warms up, then is timed
over `repeats` generations (device-synchronised; the median is reported).
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
from cachekit.errors import MissingPointError
from cachekit.metrics import quality
from cachekit.registry import resolve_adapter
from cachekit.schemas.study import StudySpec
from cachekit.stats import GenerationStats
from cachekit.study.models import StudyModel, load_model
from cachekit.study.plan import Cell, plan
from cachekit.study.store import ResultStore

ATTENTION_KINDS = ("spatial", "temporal", "cross")


@dataclass(frozen=True)
class Costs:
    """Estimated FLOPs of one uncached transformer call, of its residual span, and of one module
    site of each kind, measured once per model with torch's FLOP counter."""

    call: float
    span: float
    blocks: int
    site: dict[str, float]


def run_study(spec: StudySpec, db: str | Path, fresh: bool = False, progress: bool = True) -> Path:
    """Run every cell of `spec` not yet in `db` (all of them with `fresh`); returns the db path."""
    cells = plan(spec).cells  # validates everything before any model loads
    store = ResultStore(db)
    try:
        if fresh:
            store.clear(spec.name)
        done = store.finished(spec.name)
        todo = [cell for cell in cells if (cell.model, cell.setting.key, cell.seed, cell.condition) not in done]
        with tqdm(total=len(cells), initial=len(cells) - len(todo), unit="cell", disable=not progress) as bar:
            for name in spec.models:
                model_cells = [cell for cell in todo if cell.model == name]
                if not model_cells:
                    continue
                model = load_model(name, spec)
                costs = measure_costs(model, model_cells[0])
                for cell in model_cells:
                    bar.set_description(f"{name} seed={cell.seed} {cell.condition!r} {cell.setting.label}")
                    _run_and_store(store, spec, model, cell, costs)
                    bar.update()
    finally:
        store.close()
    return Path(db)


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
    handle = cachekit.apply(model.target, cell.setting.config) if cell.setting.config is not None else None
    first_inputs: list[str] = []
    calls = [0]

    def watch(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls[0] += 1
        if not first_inputs:
            first_inputs.append(_fingerprint(kwargs.get("hidden_states", args[0] if args else None)))

    hook = model.transformer.register_forward_pre_hook(watch, with_kwargs=True)
    try:
        generate = lambda: model.generate(cell.seed, cell.condition)  # noqa: E731
        for _ in range(spec.warmup):
            generate()
        latencies, output = [], None
        for _ in range(spec.repeats):
            first_inputs.clear()
            calls[0] = 0
            seconds, output = timed(generate, spec.device)
            latencies.append(seconds)
    finally:
        hook.remove()
        if handle is not None:
            handle.remove()
    assert output is not None
    last = handle.stats.last if handle is not None else None
    row = {
        "label": cell.setting.label,
        "strategy": cell.setting.config.strategy if cell.setting.config else "uncached",
        "latency_s": statistics.median(latencies),
        "latencies_s": latencies,
        "latents_sha": first_inputs[0],
        "notes": [],
        **_counts(last, calls[0], costs),
    }
    if handle is not None and last is not None:
        row["decisions"] = {
            branch: {"span": stats.span_schedule, "modules": stats.module_schedule}
            for branch, stats in last.branches.items()
        }
        row["stats"] = {"generation": dataclasses.asdict(last), "info": handle.stats.info}
    row["finished_at"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return output, row


def _counts(last: GenerationStats | None, calls: int, costs: Costs) -> dict[str, Any]:
    """Calls computed and reused, block executions and FLOPs, from the policy's stats."""
    sites: dict[str, list[int]] = {}
    if last is not None:
        for branch in last.branches.values():
            for kind, counts in branch.sites.items():
                total = sites.setdefault(kind, [0, 0])
                total[0] += counts.computed
                total[1] += counts.reused
    computed, reused = sites.get("span", [calls, 0])
    saved = reused * costs.span + sum(sites.get(kind, [0, 0])[1] * cost for kind, cost in costs.site.items())
    return {
        "calls": calls,
        "computed_calls": computed,
        "reused_calls": reused,
        "block_executions": computed * costs.blocks,
        "attention_computed": sum(sites.get(kind, [0, 0])[0] for kind in ATTENTION_KINDS),
        "attention_reused": sum(sites.get(kind, [0, 0])[1] for kind in ATTENTION_KINDS),
        "flops": calls * costs.call - saved,
        "flops_saved": saved,
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
    per_call = lambda module: counts.get(f"{prefix}.{names[id(module)]}", 0) / calls[0]  # noqa: E731
    blocks = _point(adapter.blocks)
    sites: dict[str, list[float]] = {}
    for site in [*_point(adapter.attention_sites), *_point(adapter.mlp_sites)]:
        sites.setdefault(site.kind.value, []).append(per_call(site.module))
    return Costs(
        call=counts.get(prefix, 0) / calls[0],
        span=sum(per_call(block) for block in blocks),
        blocks=len(blocks),
        site={kind: statistics.mean(values) for kind, values in sites.items()},
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
