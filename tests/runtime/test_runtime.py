"""The runtime on bare transformers and across generations."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import ExecutionCounter, flux_inputs

import cachekit
from cachekit.schemas import UniformConfig
from cachekit.testing import run_flux, run_wan, tiny_flux_transformer


def test_batched_cfg_call_is_one_branch():
    model = tiny_flux_transformer()
    with cachekit.apply(model, UniformConfig(interval=2, num_inference_steps=4)) as handle:
        for timestep in (1.0, 0.75, 0.5, 0.25):
            model(**flux_inputs(batch=2, timestep=timestep))
    stats = handle.stats.last
    assert list(stats.branches) == [0]
    assert stats.branches[0].span_schedule == [True, False, True, True]


def test_bare_transformer_reuse_is_input_plus_last_residual():
    """Step 1 reuses: the model's output equals running it with its blocks replaced by
    input + (output - input of the blocks at step 0), written out here by hand."""
    model = tiny_flux_transformer()
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    seen = {}

    def capture(name):
        def hook(module, args, kwargs, output=None):
            if output is None:
                seen[name] = (kwargs["hidden_states"], kwargs["encoder_hidden_states"])
            else:
                seen[name] = (output[1], output[0])

        return hook

    pre = blocks[0].register_forward_pre_hook(capture("in"), with_kwargs=True)
    post = blocks[-1].register_forward_hook(capture("out"), with_kwargs=True)
    model(**flux_inputs(timestep=1.0))
    residual = [out - inp for out, inp in zip(seen["out"], seen["in"], strict=True)]
    pre.remove()
    post.remove()

    class Replaced(torch.nn.Module):
        def forward(self, hidden_states, encoder_hidden_states, **_):
            return encoder_hidden_states + residual[1], hidden_states + residual[0]

    with cachekit.apply(model, UniformConfig(interval=2, num_inference_steps=3)):
        model(**flux_inputs(timestep=1.0))
        cached = model(**flux_inputs(timestep=0.5, seed=1))[0]
    model.transformer_blocks = torch.nn.ModuleList([Replaced()])
    model.single_transformer_blocks = torch.nn.ModuleList()
    expected = model(**flux_inputs(timestep=0.5, seed=1))[0]
    assert torch.equal(cached, expected)


def test_state_resets_between_pipeline_generations(flux_pipe):
    """Two generations give identical output: nothing of the first leaks into the second."""
    with cachekit.apply(flux_pipe, UniformConfig(interval=3)) as handle:
        first = run_flux(flux_pipe, steps=7)
        second = run_flux(flux_pipe, steps=7)
        run_flux(flux_pipe, steps=5)
    assert torch.equal(first, second)
    assert [g.num_steps for g in handle.stats.generations] == [7, 7, 5]
    assert handle.stats.generations[2].branches[1].span_schedule == [True, False, False, True, True]


def test_reset_starts_a_generation_on_a_bare_transformer():
    model = tiny_flux_transformer()
    with cachekit.apply(model, UniformConfig(interval=2, num_inference_steps=10)) as handle:
        model(**flux_inputs(timestep=1.0))
        model(**flux_inputs(timestep=0.9))
        handle.reset()
        model(**flux_inputs(timestep=0.9))
    assert [g.branches[0].span_schedule for g in handle.stats.generations] == [[True, False], [True]]


def test_pipeline_generation_length_comes_from_the_scheduler(wan_pipe):
    with cachekit.apply(wan_pipe, UniformConfig(interval=4)) as handle:
        run_wan(wan_pipe, steps=6)
    stats = handle.stats.last
    assert stats.num_steps == 6
    assert stats.branches[0].span_schedule == [True, False, False, False, True, True]
    assert handle.stats.as_dict()["generations"][0]["branches"][1]["sites"]["span"] == {"computed": 3, "reused": 3}


def test_exception_inside_a_call_leaves_the_runtime_usable():
    model = tiny_flux_transformer()
    counter = ExecutionCounter([model.transformer_blocks[0].attn])
    with cachekit.apply(model, UniformConfig(interval=1, num_inference_steps=2)) as handle:
        bad = flux_inputs()
        bad["hidden_states"] = bad["hidden_states"][..., :3]
        with pytest.raises(RuntimeError):
            model(**bad)
        model.transformer_blocks[0](
            hidden_states=torch.randn(1, 16, 32), encoder_hidden_states=torch.randn(1, 4, 32), temb=torch.randn(1, 32)
        )  # a block called on its own, outside any transformer call, just runs
        model(**flux_inputs(timestep=0.5))
    counter.close()
    assert counter.count == 2
    assert handle.stats.last.branches[0].span_schedule == [True]


def test_the_summary_shows_the_settings_sizes_a_person_reads_and_which_branch_is_which():
    from cachekit import testbed
    from cachekit.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    with cachekit.apply(pipe, {"strategy": "uniform", "interval": 3}) as handle:
        pipe(
            "a cat",
            num_inference_steps=6,
            height=32,
            width=32,
            max_sequence_length=16,
            true_cfg_scale=2.0,
            negative_prompt="blurry",
        )
    summary = handle.summary()
    assert "  settings: interval=3, warmup=1\n" in summary
    assert re.search(r"branch 0 \(cond\): 6 calls, .*kept at most \d+\.\d KiB", summary)
    assert re.search(r"branch 1 \(uncond\): 6 calls", summary)
    digits = testbed.load("flux-digits")
    with cachekit.apply(digits, {"strategy": "uniform"}) as handle:
        digits([3], num_inference_steps=4)
    assert "branch 0 (call 1 of each step)" in handle.summary() and "branch 1 (call 2 of each step)" in handle.summary()
