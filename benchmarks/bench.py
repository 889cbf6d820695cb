"""cachekit's cost, measured side by side: `nox -s bench` (or `python benchmarks/bench.py`); with
`--device cuda`, the full-size GPU benchmark instead (`benchmarks/gpu.py`).

On the CPU, real-width models with random weights and few blocks (width sets the cost; values do
not matter for timing). Every figure is the median of interleaved repeats (A B A B ...), printed
as a table and written, with min/median/max, to a JSON file.

1. overhead: each strategy attached but never reusing, against the bare model;
2. a reused call's cost against a computed call's (the probe plus re-applying the residual);
3. parity: cachekit's TeaCache against a hand-written TeaCache forward at the same threshold;
4. cachekit's PAB against diffusers' PAB hooks at equal computed attention counts;
5. graphs and graph breaks with compiled blocks;
6. host syncs per call of every strategy x estimator on real Flux and Wan pipelines (counted);
7. cachekit's host time and op launches per computed and reused call at FLUX.1-dev's and Wan's
   depth (57 and 30 hooked blocks) at tiny width, where the model's own time is small;
8. what each strategy keeps at full size (meta device).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxTransformer2DModel, WanTransformer3DModel
from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

import cachekit
from cachekit.schemas import Broadcast, PABConfig, TeaCacheConfig, UniformConfig

DEVICE = "cpu"  # the GPU's figures come from benchmarks/gpu.py (`--device cuda`)
DTYPE = torch.float32
STEPS = 6


def wan_model() -> tuple[torch.nn.Module, dict[str, Any], Callable[[torch.Tensor], dict[str, Any]]]:
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=12,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=8960,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )
    frames, size = 4, 16  # 256 tokens
    generator = torch.Generator().manual_seed(0)
    fixed = {"encoder_hidden_states": torch.randn(1, 64, 4096, generator=generator)}
    latents = torch.randn(1, 16, frames, size, size, generator=generator)
    return model, {"latents": latents, **fixed}, lambda t: {"timestep": t * 1000}


def flux_model() -> tuple[torch.nn.Module, dict[str, Any], Callable[[torch.Tensor], dict[str, Any]]]:
    model = FluxTransformer2DModel(num_layers=1, num_single_layers=2, guidance_embeds=True)
    side = 16  # 256 tokens
    generator = torch.Generator().manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    fixed = {
        "encoder_hidden_states": torch.randn(1, 16, 4096, generator=generator),
        "pooled_projections": torch.randn(1, 768, generator=generator),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.stack([torch.zeros_like(rows), rows, cols], -1).view(-1, 3).float(),
        "txt_ids": torch.zeros(16, 3),
    }
    latents = torch.randn(1, side * side, 64, generator=generator)
    return model, {"latents": latents, **fixed}, lambda t: {"timestep": t}


MODELS = {"wan2.1-1.3b-width": wan_model, "flux-width": flux_model}


def to_device(value: Any) -> Any:
    return value.to(DEVICE, DTYPE if value.is_floating_point() else None) if isinstance(value, torch.Tensor) else value


class Run:
    """An Euler loop of STEPS calls on one model, timed per call and in total."""

    def __init__(self, build: Callable[[], tuple[torch.nn.Module, dict[str, Any], Callable[..., Any]]]) -> None:
        torch.manual_seed(0)
        model, inputs, timestep = build()
        self.model = model.to(DEVICE, DTYPE).eval()
        self.latents = to_device(inputs.pop("latents"))
        self.inputs = {key: to_device(value) for key, value in inputs.items()}
        self.timestep = timestep
        self.sigmas = torch.linspace(1.0, 0.0, STEPS + 1)

    @torch.no_grad()
    def generate(self, call: Callable[..., torch.Tensor] | None = None) -> tuple[torch.Tensor, list[float]]:
        call = call or (lambda **kwargs: self.model(**kwargs, return_dict=False)[0])
        x, per_call = self.latents.clone(), []
        for sigma, next_sigma in zip(self.sigmas[:-1], self.sigmas[1:], strict=True):
            t = sigma.expand(1).to(DEVICE, DTYPE)
            began = _now()
            with self.model.cache_context("cond"):
                velocity = call(hidden_states=x, **self.inputs, **self.timestep(t))
            per_call.append(_now() - began)
            x = x + (next_sigma - sigma) * velocity
        return x, per_call


def _now() -> float:
    return time.perf_counter()


def interleaved(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each variant, run in turn (A B C A B C ...) after one warm-up round."""
    for run in variants.values():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            seconds[name].append(run())
    return seconds


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def overhead(run: Run, repeats: int) -> dict[str, Any]:
    """Strategies that never reuse, against the bare model."""
    never = {
        "uniform": UniformConfig(interval=1, num_inference_steps=STEPS),
        "teacache": TeaCacheConfig(coefficients=[1.0, 0.0], rel_l1_thresh=1e-9, num_inference_steps=STEPS),
        "pab": PABConfig(spatial=Broadcast(range=1), temporal=Broadcast(range=1), cross=Broadcast(range=1)),
    }

    def timed_with(config: Any) -> Callable[[], float]:
        def go() -> float:
            with cachekit.apply(run.model, config):
                began = _now()
                run.generate()
                return _now() - began

        return go

    def bare() -> float:
        began = _now()
        run.generate()
        return _now() - began

    seconds = interleaved({"bare": bare, **{name: timed_with(config) for name, config in never.items()}}, repeats)
    return {
        name: {"ratio": statistics.median(seconds[name]) / statistics.median(seconds["bare"]), **spread(seconds[name])}
        for name in never
    } | {"bare": spread(seconds["bare"])}


def reuse_cost(run: Run) -> dict[str, Any]:
    """Per-call seconds of computed and reused calls under uniform(2) and a TeaCache reusing as often."""
    figures = {}
    configs = {
        "uniform": UniformConfig(interval=2, num_inference_steps=STEPS),
        "teacache": TeaCacheConfig(coefficients=[0.0, 1e-6], rel_l1_thresh=1.5e-6, num_inference_steps=STEPS),
    }
    for name, config in configs.items():
        computed, reused = [], []
        for _ in range(2):
            with cachekit.apply(run.model, config) as handle:
                _, per_call = run.generate()
            schedule = handle.stats.last.branches[0].span_schedule
            computed += [s for s, c in zip(per_call, schedule, strict=True) if c]
            reused += [s for s, c in zip(per_call, schedule, strict=True) if not c]
        figures[name] = {
            "ratio": statistics.median(reused) / statistics.median(computed),
            "computed": spread(computed),
            "reused": spread(reused),
        }
    return figures


def handwritten_flux_teacache(
    model: FluxTransformer2DModel, threshold: float, coefficients: list[float]
) -> tuple[Callable[..., torch.Tensor], dict[str, Any]]:
    """TeaCache as the published integrations write it: one forward function with the cache in it.
    Returns the function and its state (which also records every probe change)."""
    import numpy as np

    rescale = np.poly1d(coefficients)
    state: dict[str, Any] = {"count": 0, "accumulated": 0.0, "previous": None, "residual": None, "computed": 0}
    state["changes"] = []

    def forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance):  # type: ignore[no-untyped-def]
        hidden_states = model.x_embedder(hidden_states)
        temb = model.time_text_embed(
            timestep.to(hidden_states.dtype) * 1000, guidance.to(hidden_states.dtype) * 1000, pooled_projections
        )
        encoder_hidden_states = model.context_embedder(encoder_hidden_states)
        rotary = model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        modulated = model.transformer_blocks[0].norm1(hidden_states, emb=temb)[0]
        if state["count"] in (0, STEPS - 1):
            compute, state["accumulated"] = True, 0.0
        else:
            previous = state["previous"]
            change = ((modulated - previous).abs().mean() / previous.abs().mean()).item()
            state["changes"].append(change)
            state["accumulated"] += rescale(change)
            compute = state["accumulated"] >= threshold
            if compute:
                state["accumulated"] = 0.0
        state["previous"], state["count"] = modulated, state["count"] + 1
        if compute:
            state["computed"] += 1
            original = hidden_states
            for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    temb=temb,
                    image_rotary_emb=rotary,
                )
            state["residual"] = hidden_states - original
        else:
            hidden_states = hidden_states + state["residual"]
        return model.proj_out(model.norm_out(hidden_states, temb))

    return forward, state


def parity(run: Run, repeats: int) -> dict[str, Any]:
    """cachekit's TeaCache against the hand-written one, same coefficients and threshold (set from
    the run's own probe changes so that about every other step reuses)."""
    coefficients = [1.0, 0.0]
    _, probing = handwritten_flux_teacache(run.model, 1e9, coefficients)
    run.generate(_)
    threshold = 1.5 * statistics.median(probing["changes"])
    handwritten, state = handwritten_flux_teacache(run.model, threshold, coefficients)
    config = TeaCacheConfig(coefficients=coefficients, rel_l1_thresh=threshold, num_inference_steps=STEPS)
    seen: dict[str, Any] = {}

    def hand() -> float:
        state.update(count=0, computed=0)
        began = _now()
        seen["hand"] = run.generate(handwritten)[0]
        return _now() - began

    def ours() -> float:
        with cachekit.apply(run.model, config) as handle:
            began = _now()
            seen["cachekit"] = run.generate()[0]
            seconds = _now() - began
        seen["computed"] = handle.stats.last.branches[0].sites["span"].computed
        return seconds

    seconds = interleaved({"hand": hand, "cachekit": ours}, repeats)
    return {
        "ratio": statistics.median(seconds["cachekit"]) / statistics.median(seconds["hand"]),
        "threshold": threshold,
        "computed": {"cachekit": seen["computed"], "hand": state["computed"], "of": STEPS},
        "max_abs_difference": (seen["hand"] - seen["cachekit"]).abs().max().item(),
        "cachekit": spread(seconds["cachekit"]),
        "hand": spread(seconds["hand"]),
    }


def against_diffusers_pab(run: Run, repeats: int) -> dict[str, Any]:
    """Spatial range 2 over timesteps (100, 800): cachekit's PAB against diffusers' hooks."""
    window = (100, 800)
    scale = 1000 if isinstance(run.model, FluxTransformer2DModel) else 1
    seen: dict[str, Any] = {"t": 1000.0}

    def call(**kwargs: Any) -> torch.Tensor:
        seen["t"] = float(kwargs["timestep"].max()) * scale
        return run.model(**kwargs, return_dict=False)[0]

    once = Broadcast(range=1)
    config = PABConfig(spatial=Broadcast(range=2, window=window), cross=once, temporal=once)
    sites = cachekit.resolve_adapter(run.model)(run.model).attention_sites()

    def attention_runs() -> Callable[[], int]:
        """Counts the attention modules that really run (their query projection executes)."""
        runs = [0]
        hooks = [site.module.to_q.register_forward_hook(lambda *_: runs.__setitem__(0, runs[0] + 1)) for site in sites]
        return lambda: [hook.remove() for hook in hooks] and runs[0]

    def ours() -> float:
        with cachekit.apply(run.model, config):
            count = attention_runs()
            began = _now()
            run.generate(call)
            seconds = _now() - began
            seen["cachekit"] = count()
        return seconds

    def theirs() -> float:
        pab = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=window,
            current_timestep_callback=lambda: seen["t"],
        )
        apply_pyramid_attention_broadcast(run.model, pab)
        try:
            count = attention_runs()
            began = _now()
            run.generate(call)
            seconds = _now() - began
            seen["diffusers"] = count()
            return seconds
        finally:
            run.model._diffusers_hook.remove_hook("pyramid_attention_broadcast", recurse=True)

    seconds = interleaved({"diffusers": theirs, "cachekit": ours}, repeats)
    return {
        "ratio": statistics.median(seconds["cachekit"]) / statistics.median(seconds["diffusers"]),
        "attention_runs": {"cachekit": seen["cachekit"], "diffusers": seen["diffusers"], "of": len(sites) * STEPS},
        "cachekit": spread(seconds["cachekit"]),
        "diffusers": spread(seconds["diffusers"]),
    }


def compiled(steps: int = 20) -> dict[str, Any]:
    """Graphs and graph breaks dynamo traces with compiled blocks: in the first generation (the
    breaks sit where cachekit's bookkeeping meets a block) and in the second (none: nothing is
    retraced). The trained flux-digits testbed model: compiling at full width takes long on a CPU."""
    from torch._dynamo.utils import counters

    from cachekit import testbed

    figures = {}
    configs = {
        "uniform": UniformConfig(interval=2),
        "teacache": TeaCacheConfig(coefficients=[1.0, 0.0], rel_l1_thresh=0.05),
        "pab": PABConfig(),
    }
    for name, config in configs.items():
        pipe = testbed.load("flux-digits")
        for block in [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]:
            block.compile()
        torch._dynamo.reset()
        counters.clear()
        with cachekit.apply(pipe, config):
            pipe([3], num_inference_steps=steps)
            first = {
                "graphs": counters["stats"]["unique_graphs"],
                "graph_breaks": sum(counters["graph_break"].values()),
            }
            counters.clear()
            pipe([3], num_inference_steps=steps)
        second = {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}
        figures[name] = {"steps": steps, "first_generation": first, "second_generation": second}
    return figures


def sync_table() -> dict[str, dict[str, list[int]]]:
    """Host syncs per transformer call of every strategy x estimator on real diffusers Flux and Wan
    pipelines with CFG, counted on the CPU (`SyncCounter`): the most in one call, and in total over
    two generations (the handle's first included)."""
    import gpu

    from cachekit.registry import get_estimator, get_strategy, list_estimators, make_config
    from cachekit.testing import SyncCounter, run_flux, run_wan, tiny_flux_pipeline, tiny_wan_pipeline

    estimators = [name for name in list_estimators() if get_estimator(name).__module__.startswith("cachekit.")]
    table: dict[str, dict[str, list[int]]] = {}
    for family, (pipe, run) in {
        "flux": (tiny_flux_pipeline(), run_flux),
        "wan": (tiny_wan_pipeline(), run_wan),
    }.items():
        for strategy in gpu.strategies():
            examples = get_strategy(strategy).example_configs()
            assert examples is not None
            for estimator in estimators:
                config = make_config({**examples.reuses.model_dump(), "estimator": {"kind": estimator}})
                with cachekit.apply(pipe, config), SyncCounter(pipe.transformer) as counter:
                    run(pipe, steps=6)
                    run(pipe, steps=6)
                table.setdefault(f"{strategy} + {estimator}", {})[family] = [
                    max(counter.per_call),
                    sum(counter.per_call),
                ]
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"))
    parser.add_argument("--device", default="cpu", help="cuda: the full-size benchmark on the GPU (benchmarks/gpu.py)")
    args, rest = parser.parse_known_args(argv)
    if args.device != "cpu":
        import gpu

        gpu.main(["--device", args.device, "--out", str(args.out.with_suffix("")), *rest])
        return
    torch.set_grad_enabled(False)
    results: dict[str, Any] = {"device": "cpu", "steps": STEPS}
    for name, build in MODELS.items():
        run = Run(build)
        figures = {"overhead": overhead(run, args.repeats), "reuse_cost": reuse_cost(run)}
        if name == "flux-width":
            figures["parity"] = parity(run, args.repeats)
        figures["pab_vs_diffusers"] = against_diffusers_pab(run, args.repeats)
        results[name] = figures
        print(json.dumps({name: figures}, indent=1), flush=True)
    results["compiled"] = compiled()
    print(json.dumps({"compiled": results["compiled"]}, indent=1), flush=True)
    results["syncs"] = sync_table()
    import gpu
    import memory

    host = gpu.main(["--device", "cpu", "--steps", "8", "--repeats", str(args.repeats), "--out", "host-cost"])
    results["host_cost_at_full_depth"] = host
    results["memory_at_full_size"] = memory.table()
    args.out.write_text(json.dumps(results, indent=2))
    print_table(results)
    print("\nHost syncs per call (most in one call, total over two generations of 6 steps with CFG)")
    print("| strategy + estimator | flux | wan |\n|---|---|---|")
    for name, counts in results["syncs"].items():
        print(f"| {name} | {counts['flux'][0]} ({counts['flux'][1]}) | {counts['wan'][0]} ({counts['wan'][1]}) |")
    print("\nWhat each strategy keeps at full size (meta device, bf16, CFG as two calls)")
    print(results["memory_at_full_size"])


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{'model':<20} {'figure':<34} {'ratio':>8}  target")
    for name in MODELS:
        figures = results[name]
        for strategy in ("uniform", "teacache", "pab"):
            ratio = figures["overhead"][strategy]["ratio"]
            print(f"{name:<20} {'overhead, never reusing: ' + strategy:<34} {ratio:>8.4f}  <= 1.01")
        for strategy, figure in figures["reuse_cost"].items():
            print(f"{name:<20} {'reused / computed call: ' + strategy:<34} {figure['ratio']:>8.4f}  <= 0.05")
        if "parity" in figures:
            p = figures["parity"]
            print(
                f"{name:<20} {'TeaCache vs hand-written':<34} {p['ratio']:>8.4f}  <= 1.00 "
                f"(computed {p['computed']}, max |diff| {p['max_abs_difference']:.2e})"
            )
        pab = figures["pab_vs_diffusers"]
        print(f"{name:<20} {'PAB vs diffusers PAB':<34} {pab['ratio']:>8.4f}  (attention runs {pab['attention_runs']})")
    for strategy, figure in results["compiled"].items():
        first, second = figure["first_generation"], figure["second_generation"]
        print(
            f"{'compiled blocks':<20} {strategy + ': traced in run 1 / run 2':<34} "
            f"graphs {first['graphs']} / {second['graphs']}, breaks {first['graph_breaks']} / {second['graph_breaks']}"
        )


if __name__ == "__main__":
    main()
