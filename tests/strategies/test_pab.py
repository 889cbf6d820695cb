"""Pyramid Attention Broadcast: per-module, per-branch reuse inside a timestep window."""

from __future__ import annotations

import warnings

import pydantic
import pytest
import torch
from helpers import ExecutionCounter

import cachekit
from cachekit.adapters.flux import FluxAdapter
from cachekit.schemas import PAB_MLP_DEFAULTS, Broadcast, MLPBroadcast, MLPBroadcastAt, PABConfig
from cachekit.testing import run_flux

STEPS = 10
WINDOW = (300.0, 900.0)  # no sampled timestep lies on a bound


def attention_modules(transformer) -> list[tuple[torch.nn.Module, str]]:
    """Every attention module with its kind, read off the model here (not from the adapter)."""
    if hasattr(transformer, "single_transformer_blocks"):
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        return [(block.attn, "spatial") for block in blocks]
    return [(m, kind) for block in transformer.blocks for m, kind in ((block.attn1, "spatial"), (block.attn2, "cross"))]


def first_tensor(output):
    return output[0] if isinstance(output, tuple) else output


def expected_computes(timesteps, every, window):
    low, high = window
    return [call % every == 0 or not low < t < high for call, t in enumerate(timesteps)]


def test_attention_executions_follow_range_and_window(family):
    pipe, run, _ = family
    ranges = {"spatial": 2, "cross": 3}
    modules = attention_modules(pipe.transformer)
    counters = [(ExecutionCounter([module.to_q]), kind) for module, kind in modules]
    config = PABConfig(spatial=Broadcast(range=2, window=WINDOW), cross=Broadcast(range=3, window=WINDOW))
    with cachekit.apply(pipe, config) as handle:
        run(pipe, steps=STEPS)
    timesteps = pipe.scheduler.timesteps.tolist()

    expected = {kind: sum(expected_computes(timesteps, every, WINDOW)) for kind, every in ranges.items()}
    assert 0 < expected["spatial"] < STEPS and 0 < expected["cross"] < STEPS
    for counter, kind in counters:
        counter.close()
        assert counter.count == 2 * expected[kind]  # two CFG branches
    for branch in (0, 1):
        sites = handle.stats.last.branches[branch].sites
        for kind in {kind for _, kind in modules}:
            per_kind = sum(1 for _, k in modules if k == kind)
            assert sites[kind].computed == per_kind * expected[kind]
            assert sites[kind].reused == per_kind * (STEPS - expected[kind])


def test_uncond_reuses_its_own_attention_output_never_the_cond_one(family):
    pipe, run, _ = family
    # The last block's: the branches' inputs differ there (in Wan's first block they do not).
    module = [module for module, kind in attention_modules(pipe.transformer) if kind == "spatial"][-1]
    outputs = []  # in call order: step 0 cond, step 0 uncond, step 1 cond, ...
    hook = module.register_forward_hook(lambda _, args, output: outputs.append(output))
    with cachekit.apply(pipe, PABConfig(spatial=Broadcast(range=3, window=(0.0, 1000.0)))):
        run(pipe, steps=STEPS)
    hook.remove()

    reused_steps = [step for step in range(STEPS) if step % 3]
    for step in reused_steps:
        computed = step - step % 3
        cond, uncond = outputs[2 * step], outputs[2 * step + 1]
        assert uncond is outputs[2 * computed + 1]
        assert cond is outputs[2 * computed]
        assert not torch.equal(first_tensor(uncond), first_tensor(outputs[2 * computed]))


def test_outside_the_window_everything_computes(family):
    pipe, run, _ = family
    uncached = run(pipe, steps=STEPS)
    counters = [ExecutionCounter([module.to_q]) for module, _ in attention_modules(pipe.transformer)]
    with pytest.warns(UserWarning, match=r"window \(0\.0, 1\.0\) lies below timestep 1 .*0-1000 scale"):
        everything = Broadcast(range=2, window=(0.0, 1.0))  # no timestep of the run lies inside
    config = PABConfig(spatial=everything, temporal=everything, cross=everything)
    with cachekit.apply(pipe, config):
        cached = run(pipe, steps=STEPS)
    assert torch.equal(cached, uncached)
    assert all(counter.count == 2 * STEPS for counter in counters)


def test_mlp_broadcast_only_in_the_chosen_blocks(family):
    pipe, run, _ = family
    transformer = pipe.transformer
    if hasattr(transformer, "single_transformer_blocks"):
        chosen = [transformer.transformer_blocks[0].ff, transformer.transformer_blocks[0].ff_context]
        others = [block.proj_mlp for block in transformer.single_transformer_blocks]
    else:
        chosen, others = [transformer.blocks[0].ffn], [transformer.blocks[1].ffn]
    inner = lambda module: module.net[0] if hasattr(module, "net") else module  # noqa: E731
    chosen_count, other_count = ExecutionCounter([inner(m) for m in chosen]), ExecutionCounter(others)
    config = PABConfig(mlp=MLPBroadcast(range=2, blocks=(0,), window=WINDOW))
    with cachekit.apply(pipe, config) as handle:
        run(pipe, steps=STEPS)
    computes = sum(expected_computes(pipe.scheduler.timesteps.tolist(), 2, WINDOW))
    assert computes < STEPS
    assert chosen_count.count == 2 * len(chosen) * computes
    assert other_count.count == 2 * len(others) * STEPS
    assert handle.stats.last.branches[1].sites["mlp"].reused == len(chosen) * (STEPS - computes)


def test_family_defaults_and_explicit_overrides(monkeypatch, flux_pipe):
    with cachekit.apply(flux_pipe, PABConfig(cross=Broadcast(range=4, window=(200, 700)))) as handle:
        pass
    info = handle.stats.info
    assert info["defaults"] == "fallback"
    assert info["spatial"] == {"range": 2, "window": (100.0, 800.0)}
    assert info["temporal"] == {"range": 3, "window": (100.0, 800.0)}
    assert info["cross"] == {"range": 4, "window": (200.0, 700.0)}

    monkeypatch.setattr(FluxAdapter, "name", "open_sora")
    with cachekit.apply(flux_pipe, PABConfig()) as handle:
        pass
    assert handle.stats.info["defaults"] == "open_sora"
    assert handle.stats.info["temporal"] == {"range": 4, "window": (450.0, 930.0)}


def test_pab_with_ranges_of_one_is_exact(flux_pipe):
    uncached = run_flux(flux_pipe, steps=6)
    once = Broadcast(range=1)
    with cachekit.apply(flux_pipe, PABConfig(spatial=once, temporal=once, cross=once)) as handle:
        cached = run_flux(flux_pipe, steps=6)
    assert torch.equal(cached, uncached)
    assert handle.stats.last.branches[0].sites["spatial"].reused == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"spatial": {"range": 0}}, r"spatial\.range\n.*greater than or equal to 1"),
        ({"cross": {"range": 2, "window": (800, 100)}}, r"cross\n.*0 <= low < high"),
        ({"mlp": {"range": 2, "blocks": ()}}, r"mlp\.MLPBroadcast\.blocks\n.*at least 1 item"),
        ({"mlp": {"range": 2, "blocks": (-1,)}}, r"mlp\.MLPBroadcast\n.*block indices >= 0"),
        ({"temporal": {"range": 2, "every": 3}}, r"temporal\.every\n  unknown field; Broadcast takes: range, window"),
    ],
)
def test_bad_pab_configs_name_the_field(fields, message):
    with pytest.raises(pydantic.ValidationError, match=rf"(?s){message}"):
        PABConfig(**fields)


def test_mlp_blocks_beyond_the_model_are_rejected_at_attach(flux_pipe):
    with pytest.raises(ValueError, match=r"mlp.blocks \[7\] out of range: the model has 3 blocks"):
        cachekit.apply(flux_pipe, PABConfig(mlp=MLPBroadcast(range=2, blocks=(7,))))


@pytest.mark.parametrize("reuse", ["gated", "output"])
def test_latte_reuses_the_gated_output_as_published_or_the_output(reuse):
    """VideoSys's PAB (Latte's default) gives the block what it added when computed, gate x output;
    diffusers' gives the output, gated again with the current gate. The gate is rebuilt here from
    the block's own table and timestep argument (row 2: self attention)."""
    from cachekit.registry import registry

    example = registry().adapters["latte"].example()
    block = example.model.transformer_blocks[0]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # per call: (gate, what attn1 returned)
    gate: dict[str, torch.Tensor] = {}

    def on_block(_, args, kwargs):
        timestep = args[4]
        gate["now"] = (block.scale_shift_table[None] + timestep.reshape(timestep.shape[0], 6, -1))[:, 2:3]

    hooks = [
        block.register_forward_pre_hook(on_block, with_kwargs=True),
        block.attn1.register_forward_hook(lambda _, args, output: seen.append((gate["now"], output))),
    ]
    config = PABConfig(spatial=Broadcast(range=2, window=(0, 1000)), reuse=None if reuse == "gated" else "output")
    try:
        with cachekit.apply(example.model, config) as handle, torch.no_grad():
            for t in (900.0, 800.0):
                example(example.latents, t, 0)
    finally:
        for hook in hooks:
            hook.remove()
    assert handle.stats.info["reuse"] == reuse and handle.stats.last.branches[0].sites["spatial"].reused > 0
    (gate_then, computed), (gate_now, returned) = seen
    assert not torch.allclose(gate_then, gate_now)
    if reuse == "gated":
        torch.testing.assert_close(gate_now * returned, gate_then * computed)
    else:
        assert returned is computed


def videosys_mlp_computes(timesteps: list[float], listed: tuple[float, ...], skip: int) -> list[bool]:
    """VideoSys's MLP rule over one schedule: compute at a listed timestep, reuse at the `skip`
    schedule positions after one, compute elsewhere."""
    hits = [t in listed for t in timesteps]
    return [hit or not any(hits[max(0, i - skip) : i]) for i, hit in enumerate(hits)]


def test_latte_broadcasts_its_mlps_from_videosys_timesteps_by_default():
    """Latte's published PAB keeps the MLP outputs of its first blocks at t = 720, 640, ..., 400
    and reuses them for the next two steps; on by default for the family, off with mlp=False."""
    from cachekit.registry import registry

    example = registry().adapters["latte"].example()
    model = example.model
    blocks = [*model.transformer_blocks, *model.temporal_transformer_blocks]
    timesteps = [800.0, 740.0, 720.0, 700.0, 680.0, 660.0, 640.0, 620.0, 600.0, 580.0, 560.0, 300.0]
    expected = videosys_mlp_computes(timesteps, (720, 640, 560, 480, 400), 2)
    assert expected.count(False) == 5

    for config, computes in [(PABConfig(), expected), (PABConfig(mlp=False), [True] * len(timesteps))]:
        counter = ExecutionCounter([block.ff.net[0] for block in blocks])
        with cachekit.apply(model, config) as handle, torch.no_grad():
            for t in timesteps:
                for branch in (0, 1):
                    example(example.latents, t, branch)
        counter.close()
        assert counter.count == 2 * len(blocks) * sum(computes)
        if config.mlp is None:
            assert handle.stats.info["mlp"] == {
                "timesteps": (720, 640, 560, 480, 400),
                "skip": 2,
                "blocks": [0, 1, 2, 3],
            }
            assert handle.stats.last.branches[1].sites["mlp"].reused == len(blocks) * computes.count(False)
        else:
            assert handle.stats.info["mlp"] is None


def test_listed_timesteps_the_schedule_misses_change_nothing(flux_pipe):
    uncached = run_flux(flux_pipe, steps=6)
    once = Broadcast(range=1)
    config = PABConfig(spatial=once, cross=once, mlp=MLPBroadcastAt(timesteps=(1.0,), blocks=(0, 1)))
    with cachekit.apply(flux_pipe, config) as handle:
        with pytest.warns(UserWarning, match=r"MLP broadcast never applied: none of its timesteps \(1\.0,\) .* 6"):
            cached = run_flux(flux_pipe, steps=6)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once
            cached_again = run_flux(flux_pipe, steps=6)
    assert torch.equal(cached, uncached) and torch.equal(cached_again, uncached)
    assert handle.stats.last.branches[0].sites["mlp"].reused == 0


def test_published_mlp_defaults():
    """VideoSys's defaults (METHODS.md), blocks counted through both alternating block lists."""
    assert PAB_MLP_DEFAULTS["open_sora"] == MLPBroadcastAt(timesteps=(676, 788, 864), skip=2, blocks=tuple(range(10)))
    osp = PAB_MLP_DEFAULTS["open_sora_plan"]
    assert (osp.timesteps[0], osp.timesteps[-1], len(osp.timesteps), osp.blocks) == (738, 426, 14, tuple(range(14)))
    assert {a - b for a, b in zip(osp.timesteps, osp.timesteps[1:], strict=False)} == {24}
    assert PAB_MLP_DEFAULTS["latte"].timesteps == (720, 640, 560, 480, 400)
    assert set(PAB_MLP_DEFAULTS) == {
        "open_sora",
        "open_sora_plan",
        "latte",
    }  # off for Open-Sora-Plan v1.2, CogVideoX, Vchitect
