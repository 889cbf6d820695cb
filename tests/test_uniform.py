"""Uniform interval reuse against an independent straight-line implementation.

The reference replaces the model's block list with one module that, per call, either runs every
block in order and stores output - input for its CFG branch, or returns input + that residual.
Steps and branches come from the pipeline's call order (cond then uncond), not from cachekit.
"""

from __future__ import annotations

import pytest
import torch
from cachekit.schemas import UniformConfig
from helpers import ExecutionCounter
from torch import nn

import cachekit

STEPS = 10


def uniform_computes(step: int, interval: int, warmup: int = 1, steps: int = STEPS) -> bool:
    return step < warmup or step == steps - 1 or step % interval == 0


class StraightLineSpan(nn.Module):
    """All blocks as one, with the residual cache written out by hand."""

    def __init__(self, blocks: list[nn.Module], interval: int, branches: int, shared_residual: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.interval = interval
        self.branches = branches
        self.shared_residual = shared_residual  # the known bug, to show the comparison can fail
        self.calls = 0
        self.residuals: dict[int, tuple[torch.Tensor, ...]] = {}

    def run(self, streams, block_call):
        step, branch = divmod(self.calls, self.branches)
        self.calls += 1
        key = 0 if self.shared_residual else branch
        if uniform_computes(step, self.interval):
            outputs = streams
            for block in self.blocks:
                outputs = block_call(block, outputs)
            self.residuals[key] = tuple(out - inp for out, inp in zip(outputs, streams, strict=True))
            return outputs
        return tuple(inp + res for inp, res in zip(streams, self.residuals[key], strict=True))


class FluxStraightLine(StraightLineSpan):
    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs=None):
        def call(block, streams):
            enc, hid = block(
                hidden_states=streams[0],
                encoder_hidden_states=streams[1],
                temb=temb,
                image_rotary_emb=image_rotary_emb,
                joint_attention_kwargs=joint_attention_kwargs,
            )
            return hid, enc

        hidden, encoder = self.run((hidden_states, encoder_hidden_states), call)
        return encoder, hidden


class WanStraightLine(StraightLineSpan):
    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        def call(block, streams):
            return (block(streams[0], encoder_hidden_states, temb, rotary_emb),)

        return self.run((hidden_states,), call)[0]


def install_straight_line(transformer, interval, shared_residual=False) -> StraightLineSpan:
    if hasattr(transformer, "single_transformer_blocks"):
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        span = FluxStraightLine(blocks, interval, branches=2, shared_residual=shared_residual)
        transformer.transformer_blocks = nn.ModuleList([span])
        transformer.single_transformer_blocks = nn.ModuleList()
    else:
        span = WanStraightLine(list(transformer.blocks), interval, branches=2, shared_residual=shared_residual)
        transformer.blocks = nn.ModuleList([span])
    return span


@pytest.mark.parametrize("interval", [2, 3])
def test_uniform_matches_straight_line_reference_and_runs_only_its_steps(family, interval):
    pipe, run, counted = family
    blocks = counted(pipe.transformer)
    counter = ExecutionCounter(blocks)
    with cachekit.apply(pipe, UniformConfig(interval=interval)) as handle:
        cached = run(pipe, steps=STEPS)
    counter.close()

    expected_schedule = [uniform_computes(step, interval) for step in range(STEPS)]
    computed = sum(expected_schedule)
    # Real block executions: every block, on computed steps only, for both CFG branches.
    assert counter.count == computed * 2 * len(blocks)
    stats = handle.stats.last
    for branch in (0, 1):
        assert stats.branches[branch].span_schedule == expected_schedule
        assert stats.branches[branch].sites["span"].computed == computed
        assert stats.branches[branch].sites["span"].reused == STEPS - computed

    uncached = run(pipe, steps=STEPS)
    install_straight_line(pipe.transformer, interval)
    reference = run(pipe, steps=STEPS)
    assert torch.equal(cached, reference)
    assert not torch.equal(cached, uncached)  # reuse really changed the result


def test_each_cfg_branch_reuses_its_own_residual(family):
    """Cond and uncond differ (prompt vs negative prompt): re-applying one branch's residual to
    the other gives a different image, so equality with the per-branch reference proves it."""
    pipe, run, _ = family
    with cachekit.apply(pipe, UniformConfig(interval=2)):
        cached = run(pipe, steps=STEPS)
    span = install_straight_line(pipe.transformer, interval=2, shared_residual=True)
    shared = run(pipe, steps=STEPS)
    span.shared_residual, span.calls = False, 0
    per_branch = run(pipe, steps=STEPS)

    assert torch.equal(cached, per_branch)
    assert not torch.equal(cached, shared)
