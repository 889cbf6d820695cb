"""Per-call cost at full depth: FLUX.1-dev's transformer (19 + 38 blocks) and Wan2.1-T2V-1.3B's (30
blocks) with random weights, side by side with the bare model in one run.

On a GPU (`--device cuda`, or `nox -s bench -- --device cuda`): full width in bf16, FLUX at 1024^2
(4096 image and 512 text tokens, one call per step: guidance-distilled) and Wan at 480p x 81
frames (32,760 tokens, CFG as two calls), at 28 and 50 steps. On a CPU: tiny width and few tokens,
so the model's own time is small and cachekit's host time shows (the fast suite runs it so).

Per strategy: latency of a computed and of a reused call against the bare model's (every
strategy's never-reusing config gives the overhead; its reusing config the reused call's cost),
host syncs per call (CUDA's sync debug mode on a GPU; `SyncCounter` on a CPU), the op launches
cachekit adds, peak memory, what the strategy keeps, and for the speed-up settings (uniform 2 and 3,
TeaCache at the published FLUX.1-dev thresholds, TeaCache with a Taylor forecast, FBCache) the
end-to-end speed-up against its limit 1 / (computed share + reused share x reused-call cost).
Writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import FluxTransformer2DModel, WanTransformer3DModel
from torch.utils._python_dispatch import TorchDispatchMode

import cachekit
from cachekit.registry import get_strategy, list_strategies, make_config
from cachekit.testing import SyncCounter

#: FLUX.1-dev's published TeaCache thresholds (0.25: 1.5x, 0.4: 1.8x, 0.6: 2.0x, 0.8: 2.25x).
FLUX_TEACACHE = (0.25, 0.4, 0.6, 0.8)


@dataclass
class Family:
    """A model family at full and at tiny width, and how one call is made."""

    name: str
    build: Callable[[bool], torch.nn.Module]
    inputs: Callable[[bool, torch.device, torch.dtype], dict[str, Any]]
    calls_per_step: int  # 2: CFG as two calls
    preset: str  # its TeaCache preset


def _flux(full: bool) -> torch.nn.Module:
    heads = (24, 128) if full else (2, 16)
    width = {"num_attention_heads": heads[0], "attention_head_dim": heads[1]}
    return FluxTransformer2DModel(
        num_layers=19,
        num_single_layers=38,
        in_channels=64,
        joint_attention_dim=4096 if full else 32,
        pooled_projection_dim=768 if full else 32,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56) if full else (4, 4, 8),
        **width,
    )


def _flux_inputs(full: bool, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    side, text = (64, 512) if full else (8, 16)  # 1024^2: 64 x 64 packed latents
    generator = torch.Generator().manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    values = {
        "hidden_states": torch.randn(1, side * side, 64, generator=generator),
        "encoder_hidden_states": torch.randn(1, text, 4096 if full else 32, generator=generator),
        "pooled_projections": torch.randn(1, 768 if full else 32, generator=generator),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.stack([torch.zeros_like(rows), rows, cols], -1).view(-1, 3).float(),
        "txt_ids": torch.zeros(text, 3),
    }
    return {key: _to(value, device, dtype) for key, value in values.items()}


def _wan(full: bool) -> torch.nn.Module:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=12 if full else 2,
        attention_head_dim=128 if full else 16,
        in_channels=16,
        out_channels=16,
        text_dim=4096 if full else 32,
        freq_dim=256,
        ffn_dim=8960 if full else 64,
        num_layers=30,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )


def _wan_inputs(full: bool, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    frames, height, width, text = (21, 60, 104, 512) if full else (2, 8, 8, 16)  # 480p x 81 frames
    generator = torch.Generator().manual_seed(0)
    values = {
        "hidden_states": torch.randn(1, 16, frames, height, width, generator=generator),
        "encoder_hidden_states": torch.randn(1, text, 4096 if full else 32, generator=generator),
    }
    return {key: _to(value, device, dtype) for key, value in values.items()}


FAMILIES = {
    "flux.1-dev": Family("flux.1-dev", _flux, _flux_inputs, calls_per_step=1, preset="flux-dev"),
    "wan2.1-t2v-1.3b": Family("wan2.1-t2v-1.3b", _wan, _wan_inputs, calls_per_step=2, preset="wan2.1-t2v-1.3b"),
}


def _to(value: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return value.to(device, dtype if value.is_floating_point() else None)


class Bench:
    """One model on one device: an Euler loop of `steps` steps (with its CFG calls), timed."""

    def __init__(self, family: Family, full: bool, device: torch.device, dtype: torch.dtype, steps: int) -> None:
        torch.manual_seed(0)
        self.family, self.device, self.steps = family, device, steps
        self.model = family.build(full).to(device, dtype).eval()
        self.inputs = family.inputs(full, device, dtype)
        self.latents = self.inputs.pop("hidden_states")
        self.conditions = [self.inputs["encoder_hidden_states"], -self.inputs["encoder_hidden_states"]]
        self.flux = isinstance(self.model, FluxTransformer2DModel)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def generate(self, per_call: list[float] | None = None, clock: Callable[[], float] | None = None) -> torch.Tensor:
        """One generation; with `per_call`, what each call took by `clock` (seconds to its end,
        synchronised, by default)."""
        now = clock or self._now
        x = self.latents.clone()
        sigmas = [*torch.linspace(1.0, 1.0 / self.steps, self.steps).tolist(), 0.0]
        for index in range(self.steps):
            sigma = sigmas[index]
            t = torch.full((1,), sigma * (1 if self.flux else 1000), device=self.device, dtype=x.dtype)
            outputs = []
            for branch in range(self.family.calls_per_step):
                began = now() if per_call is not None else 0.0
                context = ("cond", "uncond")[branch]
                given = {"step_index": index, "num_inference_steps": self.steps, "timestep": sigma * 1000}
                with self.model.cache_context(context, **given):
                    inputs = {**self.inputs, "encoder_hidden_states": self.conditions[branch]}
                    outputs.append(self.model(hidden_states=x, timestep=t, **inputs, return_dict=False)[0])
                if per_call is not None:
                    per_call.append(now() - began)
            velocity = outputs[0] if len(outputs) == 1 else outputs[1] + 3.0 * (outputs[0] - outputs[1])
            x = x + (sigmas[index + 1] - sigma) * velocity
        return x

    def _now(self) -> float:
        self.sync()
        return time.perf_counter()

    def seconds(self) -> float:
        """One whole generation, synchronised at its end only."""
        self.sync()
        began = time.perf_counter()
        self.generate()
        self.sync()
        return time.perf_counter() - began


@contextlib.contextmanager
def applied(bench: Bench, config: Any) -> Iterator[Any]:
    if config is None:
        yield None
        return
    with cachekit.apply(bench.model, config) as handle:
        yield handle


def per_call(bench: Bench, config: Any, repeats: int) -> tuple[list[float], list[bool], Any]:
    """Each call's seconds over `repeats` generations (after one warm-up) and whether it computed."""
    seconds: list[float] = []
    computed: list[bool] = []
    with applied(bench, config) as handle:
        bench.generate([])
        for _ in range(repeats):
            bench.generate(seconds)
            computed += _computed(handle, bench)
    return seconds, computed, handle


@dataclass
class Rounds:
    """Per-call seconds under two contexts, round by round."""

    first: list[list[float]]
    second: list[list[float]]
    computed: list[list[bool]]  # per call of the second: whether it computed
    handle: Any  # the second's, if a strategy

    def ratio(self) -> float:
        """The second's median call over the first's, the median over rounds."""
        pairs = zip(self.first, self.second, strict=True)
        return statistics.median([statistics.median(b) / statistics.median(a) for a, b in pairs])

    def reused_over_first(self) -> float | None:
        """The second's median reused call minus the first's median call, the median over rounds."""
        differences = [
            statistics.median(r) - statistics.median(a)
            for a, b, c in zip(self.first, self.second, self.computed, strict=True)
            if (r := [s for s, computed in zip(b, c, strict=True) if not computed])
        ]
        return statistics.median(differences) if differences else None

    def reused(self) -> float | None:
        pairs = zip(self.second, self.computed, strict=True)
        return median([s for b, c in pairs for s, x in zip(b, c, strict=True) if not x])


def side_by_side(bench: Bench, first: Callable[[], Any], second: Callable[[], Any], repeats: int) -> Rounds:
    """Generations under two contexts (`applied(...)`, `blocks_passing_through(...)`) taken in
    turn (A B A B ...) after a warm-up of each, so a drifting clock (a shared machine) drifts both
    alike."""
    rounds = Rounds([], [], [], None)
    for round_ in range(repeats + 1):
        seconds: list[list[float]] = [[], []]
        for index, context in enumerate((first, second)):
            with context() as entered:
                bench.generate(seconds[index])
                if index == 1:
                    rounds.handle = entered
                    computed = _computed(entered, bench)
        if round_:
            rounds.first.append(seconds[0])
            rounds.second.append(seconds[1])
            rounds.computed.append(computed)
    return rounds


def _computed(handle: Any, bench: Bench) -> list[bool]:
    """Per call of the last generation, in call order: whether it computed (all, without a strategy)."""
    calls = bench.steps * bench.family.calls_per_step
    if handle is None:
        return [True] * calls
    branches = handle.stats.last.branches
    order = []
    for index in range(bench.steps):
        for branch in sorted(branches):
            stats = branches[branch]
            if stats.span_schedule:
                order.append(stats.span_schedule[index])
            elif stats.module_schedule:
                order.append(stats.module_schedule[index] == max(stats.module_schedule))
            else:
                order.append(True)
    return order


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


class OpCounter(TorchDispatchMode):
    """Counts the ops dispatched (each one a kernel launch on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_call(bench: Bench, config: Any) -> tuple[float, float | None]:
    """Median ops dispatched per computed and per reused call."""
    counts: list[float] = []
    with applied(bench, config) as handle:
        bench.generate()
        ops = OpCounter()
        with ops:
            bench.generate(counts, clock=lambda: float(ops.count))
        computed = _computed(handle, bench)
    return (
        median([n for n, c in zip(counts, computed, strict=True) if c]) or 0.0,
        median([n for n, c in zip(counts, computed, strict=True) if not c]),
    )


@contextlib.contextmanager
def blocks_passing_through(bench: Bench) -> Iterator[None]:
    """The model with every block returning its inputs, without cachekit: what a reused call
    costs the model itself (embedding, the loop over the blocks, the output head)."""
    model = bench.model
    blocks = cachekit.resolve_adapter(model)(model).span().blocks
    for block, streams in blocks:
        block.forward = lambda *args, _streams=streams, **kwargs: _streams.passed(args, kwargs)
    try:
        yield
    finally:
        for block, _ in blocks:
            del block.forward


def syncs_per_call(bench: Bench, config: Any) -> float:
    """Host syncs per call over a generation after the handle's first (CUDA's sync debug mode on a
    GPU, the counted sync-causing calls on a CPU); the most in any one call on a CPU."""
    with applied(bench, config):
        bench.generate()
        if bench.device.type != "cuda":
            with SyncCounter(bench.model) as counter:
                bench.generate()
            return max(counter.per_call)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                bench.generate()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / (bench.steps * bench.family.calls_per_step)


def peak_memory(bench: Bench, config: Any) -> tuple[int | None, int]:
    """(peak device memory of a generation, bytes the strategy keeps over its branches)."""
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(bench.device)
    with applied(bench, config) as handle:
        bench.generate()
    peak = torch.cuda.max_memory_allocated(bench.device) if bench.device.type == "cuda" else None
    kept = 0
    if handle is not None:
        kept = sum(b.peak_kept_bytes + b.strategy_bytes for b in handle.stats.last.branches.values())
    return peak, kept


def inner_block_cost(bench: Bench, calls: int = 20000) -> dict[str, float]:
    """Seconds one inner block of the span takes in a reused call (all cachekit adds per hooked
    block, the fixed per-call part aside), against a module that only returns its inputs, called
    alike: timed inside a reused call, where the block is reached."""
    config = make_config({"strategy": "uniform", "interval": 1000, "num_inference_steps": bench.steps})
    figures: dict[str, float] = {}
    with cachekit.apply(bench.model, config) as handle:
        frames = handle._runtime.frames
        block, place = next((b, p) for b, p in reversed(handle._runtime._places) if p.inner)

        class Passing(torch.nn.Module):
            def forward(self, *args: Any, **kwargs: Any) -> Any:
                return place.streams.passed(args, kwargs)

        passing = Passing()

        def measure(module: Any, args: Any, kwargs: Any) -> None:
            if figures or frames.call is None or frames.call.compute:
                return
            figures["passing"] = _fastest(lambda: passing(*args, **kwargs), calls)
            figures["hooked"] = _fastest(lambda: block(*args, **kwargs), calls)

        watching = block.register_forward_pre_hook(measure, with_kwargs=True, prepend=True)
        try:
            bench.generate()
        finally:
            watching.remove()
    return {**figures, "added": figures["hooked"] - figures["passing"]}


def _fastest(call: Callable[[], Any], calls: int, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        began = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - began) / calls)
    return best


def strategies() -> list[str]:
    """Every installed strategy with example configs: what the tables cover."""
    return [name for name in list_strategies() if get_strategy(name).example_configs() is not None]


def speedup_settings(family: Family, steps: int) -> dict[str, Any]:
    teacache = {"strategy": "teacache", "preset": family.preset}
    settings: dict[str, Any] = {
        "uniform 2": {"strategy": "uniform", "interval": 2},
        "uniform 3": {"strategy": "uniform", "interval": 3},
        **{f"teacache {t}": {**teacache, "rel_l1_thresh": t} for t in FLUX_TEACACHE},
        "teacache 0.4 + taylor 2": {**teacache, "rel_l1_thresh": 0.4, "estimator": {"kind": "taylor", "order": 2}},
        "fbcache": {"strategy": "fbcache"},
    }
    return {name: make_config({**values, "num_inference_steps": steps}) for name, values in settings.items()}


def measure(
    family: Family,
    full: bool,
    device: torch.device,
    dtype: torch.dtype,
    steps: int,
    repeats: int,
    only: list[str] | None = None,
    settings: list[str] | None = None,
) -> dict[str, Any]:
    """Every strategy's figures (or `only` those), and the speed-up `settings` (default: all)."""
    bench = Bench(family, full, device, dtype, steps)
    bare_calls, _, _ = per_call(bench, None, repeats)
    bare_call = median(bare_calls)
    assert bare_call is not None
    bare_ops, _ = ops_per_call(bench, None)
    bare_peak, _ = peak_memory(bench, None)
    with blocks_passing_through(bench):
        passing_calls, _, _ = per_call(bench, None, repeats)
        passing_ops, _ = ops_per_call(bench, None)
    strategies: dict[str, Any] = {}
    for name in only or strategies():
        examples = get_strategy(name).example_configs()
        assert examples is not None
        never, reuses = (make_config({**config.model_dump(), "num_inference_steps": steps}) for config in examples)
        bare = functools.partial(applied, bench, None)
        overhead = side_by_side(bench, bare, functools.partial(applied, bench, never), repeats)
        passing = functools.partial(blocks_passing_through, bench)
        reuse = side_by_side(bench, passing, functools.partial(applied, bench, reuses), repeats)
        runtime = overhead.handle._runtime
        hooked = len(runtime._places) + len(runtime._sites)
        span_level = bool(runtime._places) and not runtime._sites
        computed_extra = overhead.ratio() - 1
        reused_call, reused_extra = reuse.reused(), reuse.reused_over_first()
        computed_ops, _ = ops_per_call(bench, never)
        _, reused_ops = ops_per_call(bench, reuses)
        peak, kept = peak_memory(bench, reuses)
        strategies[name] = {
            "overhead": 1 + computed_extra,
            "reused_call": reused_call,
            "reused_cost": None if reused_call is None else reused_call / bare_call,
            "hooked": hooked,
            "host_computed_per_hook": computed_extra * bare_call / hooked,
            # a reused span-level call runs no block: what it adds to the model without its blocks is cachekit's
            "host_reused_per_hook": reused_extra / hooked if span_level and reused_extra is not None else None,
            "ops_added_computed": computed_ops - bare_ops,
            "ops_added_reused": None if reused_ops is None else reused_ops - passing_ops,
            "syncs_per_call": syncs_per_call(bench, reuses),
            "peak_memory": peak,
            "peak_memory_over_bare": None if peak is None or bare_peak is None else peak - bare_peak,
            "kept_bytes": kept,
        }
    inner = inner_block_cost(bench)
    bare_seconds = [bench.seconds() for _ in range(repeats)]
    speedups: dict[str, Any] = {}
    for name, config in speedup_settings(family, steps).items():
        if settings is not None and name not in settings:
            continue
        calls, computed, _ = per_call(bench, config, 1)
        with applied(bench, config):
            bench.generate()
            seconds = [bench.seconds() for _ in range(repeats)]
        reused = [s for s, c in zip(calls, computed, strict=True) if not c]
        share = sum(computed) / len(computed)
        cost = (median(reused) or 0.0) / bare_call
        limit = 1 / (share + (1 - share) * cost)
        speedup = statistics.median(bare_seconds) / statistics.median(seconds)
        speedups[name] = {"computed_share": share, "speedup": speedup, "limit": limit, "of_limit": speedup / limit}
    return {
        "family": family.name,
        "steps": steps,
        "bare_call": bare_call,
        "bare_ops_per_call": bare_ops,
        "passing_call": median(passing_calls),
        "passing_ops_per_call": passing_ops,
        "bare_peak_memory": bare_peak,
        "inner_block": inner,
        "strategies": strategies,
        "speedups": speedups,
    }


def environment(device: torch.device, full: bool, dtype: torch.dtype, argv: list[str]) -> dict[str, Any]:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cachekit": cachekit.__name__,
        "date": date.today().isoformat(),
        "width": "full" if full else "tiny",
        "dtype": str(dtype).removeprefix("torch."),
        "command": "python benchmarks/gpu.py " + " ".join(argv),
    }


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        f"{env['device']}, torch {env['torch']}, diffusers {env['diffusers']}, {env['dtype']}, "
        f"{env['width']} width, {env['date']}: `{env['command']}`",
        "",
    ]
    for run in results["runs"]:
        inner = run["inner_block"]
        lines += [
            f"**{run['family']}, {run['steps']} steps**: bare call {run['bare_call'] * 1e3:.2f} ms, "
            f"{run['bare_ops_per_call']:.0f} ops; with blocks passing their inputs through "
            f"{run['passing_call'] * 1e3:.2f} ms, {run['passing_ops_per_call']:.0f} ops; an inner block of a "
            f"reused call {inner['hooked'] * 1e6:.2f} us against {inner['passing'] * 1e6:.2f} us for a module "
            f"returning its inputs: cachekit adds {inner['added'] * 1e6:.2f} us per block",
            "",
            "| strategy | computed / bare | reused / bare | hooked | host per hook: computed, reused "
            "| ops added: computed, reused | syncs per call | kept | peak over bare |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, f in run["strategies"].items():
            reused, peak = f["reused_cost"], f["peak_memory_over_bare"]
            lines.append(
                f"| {name} | {f['overhead']:.4f} | {_or(reused, '.4f')} | {f['hooked']} "
                f"| {f['host_computed_per_hook'] * 1e6:.2f} us, {_or(f['host_reused_per_hook'], '.2f', 1e6)} us "
                f"| {f['ops_added_computed']:.0f}, {_or(f['ops_added_reused'], '.0f')} | {f['syncs_per_call']:g} "
                f"| {f['kept_bytes'] / 2**20:.1f} MiB | {_or(peak, '.0f', 2**-20)} MiB |"
            )
        lines += ["", "| setting | computed share | speed-up | limit | of limit |", "|---|---|---|---|---|"]
        for name, figures in run["speedups"].items():
            lines.append(
                f"| {name} | {figures['computed_share']:.2f} | {figures['speedup']:.2f}x | {figures['limit']:.2f}x "
                f"| {figures['of_limit']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def _or(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", choices=["full", "tiny"], default=None, help="default: full on CUDA, else tiny")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, nargs="+", default=[28, 50])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--families", nargs="+", default=sorted(FAMILIES), choices=sorted(FAMILIES))
    parser.add_argument("--strategies", nargs="+", default=None, help="default: every registered strategy")
    parser.add_argument("--settings", nargs="+", default=None, help="speed-up settings by name; default: all")
    parser.add_argument("--out", type=Path, default=Path("gpu-bench"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    full = (args.width or ("full" if device.type == "cuda" else "tiny")) == "full"
    dtype = getattr(torch, args.dtype)
    torch.set_grad_enabled(False)
    results: dict[str, Any] = {"environment": environment(device, full, dtype, argv or []), "runs": []}
    for name in args.families:
        for steps in args.steps:
            run = measure(FAMILIES[name], full, device, dtype, steps, args.repeats, args.strategies, args.settings)
            results["runs"].append(run)
            print(f"{name}, {steps} steps: done", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "results.md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
