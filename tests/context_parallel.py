"""Running diffusers' context parallelism in CPU processes with gloo, for the tests.

Two shims, for tests only (cachekit itself never patches diffusers): a CPU build of torch reports
`torch.accelerator.device_count()` as 0, which diffusers divides by when it makes its mesh; and
ring attention needs the log-sum-exp of each attention chunk, which diffusers' "native" backend
refuses to return on CPU (torch's CPU flash kernel computes it).

`spawn(worker, world, *args)` runs `worker(rank, world, *args)` in `world` processes and fails,
instead of hanging, if they have not finished within the watchdog's time: a collective that one
rank never joins would otherwise wait forever.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WATCHDOG_SECONDS = 120


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spawn(worker: Callable[..., None], world: int, *args: Any, timeout: float = WATCHDOG_SECONDS) -> None:
    context = mp.spawn(_run, args=(world, _free_port(), worker, args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"the {world} processes did not finish within {timeout:.0f} s: a collective hung")


def _run(rank: int, world: int, port: int, worker: Callable[..., None], args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    install_shims(world)
    try:
        worker(rank, world, *args)
        dist.barrier()  # no rank tears its connections down while another still sends on them
    finally:
        dist.destroy_process_group()


def install_shims(world: int) -> None:
    from diffusers.models import attention_dispatch

    torch.accelerator.device_count = lambda: world  # type: ignore[assignment]
    native = attention_dispatch._native_attention_forward_op

    def with_lse(
        ctx,
        query,
        key,
        value,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
        return_lse=False,
        _save_ctx=True,
        _parallel_config=None,
    ):
        if not return_lse:
            return native(
                ctx,
                query,
                key,
                value,
                attn_mask,
                dropout_p,
                is_causal,
                scale,
                enable_gqa,
                False,
                _save_ctx,
                _parallel_config,
            )
        q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, scale=scale
        )[:2]
        return out.permute(0, 2, 1, 3), lse.permute(0, 2, 1)

    attention_dispatch._native_attention_forward_op = with_lse


# -- what the tests run in each process ----------------------------------------------------------

STEPS = 6


def example(family: str) -> Any:
    from cachekit.registry import registry

    return registry().adapters[family].example()


def denoise(model_example: Any) -> torch.Tensor:
    return model_example.denoise(STEPS)


def schedules(handle: Any) -> dict[int, tuple[list[Any], int]]:
    """Per branch, what the strategy decided at each call (the span, or how many modules computed)
    and how many calls the branch level produced."""
    return {
        branch: (stats.span_schedule or stats.module_schedule, stats.produced)
        for branch, stats in handle.stats.last.branches.items()
    }


def parallel(model: torch.nn.Module, world: int, kind: str) -> None:
    from diffusers import ContextParallelConfig

    degree = {"ulysses_degree": world} if kind == "ulysses" else {"ring_degree": world}
    model.enable_parallelism(config=ContextParallelConfig(**degree))


def shard_changes(family: str, world: int) -> list[float]:
    """Single-process: the probe's relative L1 change from step 0 to step 1 (cond branch) within
    each rank's shard of the tokens, so a threshold can lie between the shards."""
    from cachekit.registry import resolve_adapter
    from cachekit.signals import relative_l1

    model_example = example(family)
    adapter = resolve_adapter(model_example.model)(model_example.model)
    probes: list[torch.Tensor] = []
    hook = adapter.blocks()[0].register_forward_pre_hook(
        lambda _, args, kwargs: probes.append(adapter.probe(args, kwargs)), with_kwargs=True
    )
    try:
        denoise(model_example)
    finally:
        hook.remove()
    first, second = probes[0], probes[2]  # step 0 and step 1 of the cond branch
    return [
        relative_l1(now, before)
        for now, before in zip(second.chunk(world, dim=1), first.chunk(world, dim=1), strict=True)
    ]


#: Not a strategy: uniform with the branch level, which produces the second CFG branch from the first.
BRANCH_LEVEL = "uniform with the branch level"


def strategy(name: str, changes: list[float]) -> Any:
    """The config each strategy is checked with: its reusing example, or where that would not tell
    a shard's decision from the whole's, a sharper one: TeaCache's threshold lies between the two
    shards' changes, so deciding from a shard would split the ranks."""
    import cachekit
    from cachekit.schemas import (
        Broadcast,
        EasyCacheConfig,
        FBCacheConfig,
        PABConfig,
        SeaCacheConfig,
        TeaCacheConfig,
        UniformConfig,
    )

    everywhere = Broadcast(range=2, window=(0, 1000))
    sharper = {
        "pab": lambda: PABConfig(spatial=everywhere, cross=everywhere),
        "teacache": lambda: TeaCacheConfig(
            coefficients=(1.0, 0.0), rel_l1_thresh=sum(changes) / len(changes), num_inference_steps=STEPS
        ),
        "fbcache": lambda: FBCacheConfig(threshold=0.3),
        "seacache": lambda: SeaCacheConfig(threshold=0.5, num_inference_steps=STEPS),
        "easycache": lambda: EasyCacheConfig(warmup_steps=2, threshold=0.5, num_inference_steps=STEPS),
        BRANCH_LEVEL: lambda: UniformConfig(interval=2, num_inference_steps=STEPS, branches={"interval": 2}),
    }
    if name in sharper:
        return sharper[name]()
    example = cachekit.get_strategy(name).example_configs().reuses
    return example.model_copy(update={"num_inference_steps": STEPS})


def strategies() -> list[str]:
    """Every installed strategy that ships example configs (the registry's, a plugin's included)."""
    import cachekit

    return [name for name in cachekit.list_strategies() if cachekit.get_strategy(name).example_configs() is not None]


def check_decisions_agree(rank: int, world: int, kind: str, families: list[str], names: list[str]) -> None:
    """For each family and strategy, in both orders of `apply` and `enable_parallelism`: every rank's
    schedule equals the single-process schedule and its output the single-process cached output;
    after `.remove()` diffusers' parallel model still gives the uncached output."""
    import cachekit

    for family in families:
        single = example(family)
        uncached = denoise(single)
        changes = shard_changes(family, world)
        for name in names:
            config = strategy(name, changes)
            with cachekit.apply(single.model, config) as handle:
                expected = denoise(single)
            expected_schedule = schedules(handle)
            for order in ("apply first", "parallel first"):
                model_example = example(family)
                if order == "parallel first":
                    parallel(model_example.model, world, kind)
                handle = cachekit.apply(model_example.model, config)
                if order == "apply first":
                    parallel(model_example.model, world, kind)
                output = denoise(model_example)
                handle.remove()
                where = f"{family} {name} ({order}, rank {rank})"
                assert schedules(handle) == expected_schedule, f"{where}: {schedules(handle)} != {expected_schedule}"
                torch.testing.assert_close(output, expected, rtol=0, atol=1e-5, msg=lambda m, w=where: f"{w}: {m}")
                torch.testing.assert_close(denoise(model_example), uncached, rtol=0, atol=1e-5)


def check_divergence_is_named(rank: int, world: int) -> None:
    """A plugin strategy that decides from the rank: both ranks raise the named error at the same call."""
    from typing import Literal

    import cachekit
    from cachekit.errors import RankDivergenceError
    from cachekit.hookspecs import hookimpl
    from cachekit.schemas import StrategyConfig

    class ByRankConfig(StrategyConfig):
        strategy: Literal["by_rank"] = "by_rank"

    class ByRank(cachekit.Strategy):  # type: ignore[type-arg]
        config_class = ByRankConfig
        requires = frozenset({cachekit.Place.SPAN})

        def decide_span(self, step, signals, state):
            return step.index == 0 or dist.get_rank() == 0  # rank 1 skips what rank 0 computes

    class Plugin:
        @hookimpl
        def cachekit_register_strategies(self, register):
            register(ByRank)

    cachekit.register_plugin(Plugin(), "by-rank")
    model_example = example("wan")
    parallel(model_example.model, world, "ulysses")
    try:
        with cachekit.apply(model_example.model, {"strategy": "by_rank"}):
            denoise(model_example)
    except RankDivergenceError as error:
        assert "decided differently at step 1 (branch 0)" in str(error), str(error)
    else:
        raise AssertionError(f"rank {rank}: no RankDivergenceError")
