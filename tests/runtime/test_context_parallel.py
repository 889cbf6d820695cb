"""Consistent decisions under diffusers' context parallelism: two gloo processes on CPU run the
tiny Flux and Wan with the sequence split over them, with each built-in strategy whose decision
depends on data (and the schedule-only ones), in both orders of `apply` and `enable_parallelism`.
A watchdog fails a test whose processes hang."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from context_parallel import BRANCH_LEVEL, check_decisions_agree, check_divergence_is_named, spawn, strategies
from helpers import data_dependent
from torch.utils._python_dispatch import TorchDispatchMode

import cachekit
from cachekit.registry import get_strategy, list_strategies, registry
from cachekit.testing import meta_reads


def test_every_rank_decides_as_one_process_would_under_ulysses():
    spawn(check_decisions_agree, 2, "ulysses", ["flux", "wan"], [*strategies(), BRANCH_LEVEL])


@pytest.mark.slow
def test_every_rank_decides_as_one_process_would_under_ring_attention():
    spawn(check_decisions_agree, 2, "ring", ["flux", "wan"], strategies())


def test_a_rank_divergent_plugin_strategy_gets_the_named_error_on_every_rank():
    spawn(check_divergence_is_named, 2)


class Collectives:
    """A stand-in for the process group: records what each collective would be handed (nothing runs)."""

    def __init__(self, monkeypatch):
        self.handed: list[torch.Tensor] = []
        monkeypatch.setattr(torch.distributed, "all_reduce", self.all_reduce)

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        assert group is self
        self.handed.append(tensor)


class Float64Copies(TorchDispatchMode):
    """Records every float64 tensor an op makes, bigger than a handful of sums."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, tuple | list) else (out,):
            if isinstance(value, torch.Tensor) and value.dtype == torch.float64 and value.numel() > 8:
                self.made.append((str(func), tuple(value.shape)))
        return out


def on_meta(value):
    if not isinstance(value, torch.Tensor):
        return value
    return value.to("meta", torch.bfloat16 if value.is_floating_point() else None)


@pytest.mark.parametrize("strategy", [name for name in list_strategies() if data_dependent(name)])
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_signals_and_votes_stay_on_the_device_and_in_the_signal_s_size(monkeypatch, family, strategy):
    """As on a GPU under NCCL (which takes device tensors only): the whole bf16 model on the meta
    device, a stand-in process group. Every tensor a collective gets is on the model's device, the
    float64 sums never copy a signal whole, and the rank vote of a strategy not rank-consistent
    runs there too."""
    example = registry().adapters[family].example()
    model = example.model.to("meta", torch.bfloat16)
    latents = on_meta(example.latents)
    group = Collectives(monkeypatch)
    config = get_strategy(strategy).example_configs().reuses.model_copy(update={"num_inference_steps": 4})

    def generate():
        copies = Float64Copies()
        with copies:
            for index in range(4):
                for branch in ("cond", "uncond"):
                    timestep = 900.0 - 200 * index
                    with model.cache_context(branch, step_index=index, num_inference_steps=4, timestep=timestep):
                        inputs = example.inputs(latents, timestep, branch == "uncond")
                        model(**{key: on_meta(value) for key, value in inputs.items()})
        return Counter(copies.made)

    bare = generate()  # the model's own (rotary tables in float64)
    with cachekit.apply(model, config, process_group=group) as handle, meta_reads():
        handle.strategy.rank_consistent = False  # its decisions are voted on, too
        cached = generate()
    assert group.handed and {tensor.device.type for tensor in group.handed} == {"meta"}
    votes = [tensor for tensor in group.handed if tensor.shape == (2,) and tensor.dtype == torch.float32]
    assert len(votes) == 8  # one per call
    assert cached - bare == Counter()  # no float64 copy of a signal
