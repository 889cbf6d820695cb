"""The Flux and Wan adapters expose the right points of the real diffusers models."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel
from strategies_for_tests import EveryThird, RecordSignals

import cachekit
from cachekit import SiteKind
from cachekit.adapters.flux import FluxAdapter
from cachekit.adapters.wan import WanAdapter
from cachekit.testing import run_flux, tiny_flux_transformer, tiny_wan_transformer


def attention_inputs(module):
    """What the first block's attention receives: the timestep-modulated input (the oracle)."""
    seen = []

    def hook(_, args, kwargs):
        seen.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


def test_probe_equals_the_modulated_input_block_0_attends_to(family, register_strategy):
    pipe, run, _ = family
    first = pipe.transformer.transformer_blocks[0] if run is run_flux else pipe.transformer.blocks[0]
    attention = first.attn if run is run_flux else first.attn1
    oracle, hook = attention_inputs(attention)
    register_strategy(RecordSignals)
    RecordSignals.seen.clear()
    with cachekit.apply(pipe, {"strategy": "record_signals"}):
        run(pipe, steps=3)
    hook.remove()

    assert [(index, branch) for index, branch, _ in RecordSignals.seen] == [(s, b) for s in range(3) for b in (0, 1)]
    assert len(oracle) == 6
    for (_, _, probe), expected in zip(RecordSignals.seen, oracle, strict=True):
        torch.testing.assert_close(probe, expected, rtol=0, atol=0)


def test_probe_is_not_computed_for_a_strategy_that_does_not_ask(flux_pipe, register_strategy, monkeypatch):
    calls = []
    monkeypatch.setattr(FluxAdapter, "probe", lambda self, args, kwargs: calls.append(1))
    register_strategy(EveryThird)
    with cachekit.apply(flux_pipe, {"strategy": "every_third"}):
        run_flux(flux_pipe, steps=3)
    assert calls == []


def test_attention_sites_and_blocks(flux_pipe, wan_pipe):
    flux = FluxAdapter(flux_pipe.transformer)
    assert [(site.name, site.kind) for site in flux.attention_sites()] == [
        ("transformer_blocks.0.attn", SiteKind.SPATIAL),
        ("single_transformer_blocks.0.attn", SiteKind.SPATIAL),
        ("single_transformer_blocks.1.attn", SiteKind.SPATIAL),
    ]
    assert all(site.module is flux_pipe.transformer.get_submodule(site.name) for site in flux.attention_sites())
    assert len(flux.blocks()) == 3

    wan = WanAdapter(wan_pipe.transformer)
    assert [(site.name, site.kind) for site in wan.attention_sites()] == [
        ("blocks.0.attn1", SiteKind.SPATIAL),
        ("blocks.0.attn2", SiteKind.CROSS),
        ("blocks.1.attn1", SiteKind.SPATIAL),
        ("blocks.1.attn2", SiteKind.CROSS),
    ]
    assert wan.blocks() == list(wan_pipe.transformer.blocks)


def test_resolution_picks_the_adapter_of_the_most_derived_class(wan_pipe):
    class MyFlux(FluxTransformer2DModel):
        pass

    assert cachekit.resolve_adapter(MyFlux.from_config(tiny_flux_transformer().config)) is FluxAdapter
    assert cachekit.resolve_adapter(wan_pipe.transformer) is WanAdapter


def test_wan_probe_with_a_timestep_per_token_matches_the_attention_input():
    """Wan 2.2 TI2V gives every video token its own timestep: the modulation is per token."""
    model = tiny_wan_transformer()
    adapter = WanAdapter(model)
    seen = {}

    def on_block(_, args, kwargs):
        seen.setdefault("probe", adapter.probe(args, kwargs))

    oracle, hook = attention_inputs(model.blocks[0].attn1)
    block_hook = model.blocks[0].register_forward_pre_hook(on_block, with_kwargs=True)
    timestep = torch.linspace(900, 100, 32)[None]  # 2 frames of 4x4 tokens
    with torch.no_grad():
        model(hidden_states=torch.randn(1, 4, 2, 8, 8), timestep=timestep, encoder_hidden_states=torch.randn(1, 8, 16))
    hook.remove()
    block_hook.remove()
    torch.testing.assert_close(seen["probe"], oracle[0], rtol=0, atol=0)
