"""Test helpers that look at models from the outside, independently of cachekit.

`install_straight_line` is the reference every span-level strategy is checked against: it swaps the
model's block list for one module that either runs every block in order and stores
output - input for the call's CFG branch, or returns input + that residual. Steps and branches
come from the call order (cond then uncond), the probe is rebuilt here from the block's inputs,
and the decision is a plain function written in the test.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cachekit.adapter import LATENT, OUTPUT, PROBE, PROJECTED_TIMESTEP_EMBEDDING, TIMESTEP_EMBEDDING
from cachekit.testing import RunCounter, module_state

__all__ = ["ROOT", "TESTS", "RunCounter", "module_state"]

#: The tests folder (its data, plugin packages and helpers) and the checkout it is in.
TESTS = Path(__file__).parent
ROOT = TESTS.parent

#: The points whose values a strategy decides from (besides the first blocks' residual).
SIGNALS = {PROBE, LATENT, OUTPUT, TIMESTEP_EMBEDDING, PROJECTED_TIMESTEP_EMBEDDING}


def data_dependent(name: str) -> bool:
    """Whether the strategy's reusing example decides from values the model computes (then it
    reads one per decision), not from the schedule alone."""
    from cachekit.registry import get_strategy

    strategy_class = get_strategy(name)
    examples = strategy_class.example_configs()
    if examples is None:
        return False
    strategy = strategy_class(examples.reuses)
    return bool(strategy.required_points() & SIGNALS) or strategy.always_computed() != (0, 0)


class ExecutionCounter:
    """Counts real executions of modules inside the blocks with plain torch forward hooks."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.count = 0
        self._handles = [module.register_forward_hook(self._hit) for module in modules]

    def _hit(self, *_: object) -> None:
        self.count += 1

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def cell_row(setting: str, seed: int, psnr: float, share: float, method: str, label: str | None = None) -> dict:
    """A results row as `ResultStore.rows()` gives it, for report tests made without running a study:
    flux-digits, label 3, 10 calls of 6 blocks, one timed generation as long as its share of blocks.
    `method` is the strategy too (a diffusers method's name marks it as diffusers')."""
    calls = 10
    return {
        "model": "flux-digits",
        "setting": setting,
        "label": label or setting,
        "method": method,
        "strategy": method,
        "seed": seed,
        "condition": "3",
        "latencies": [share],
        "computed_calls": round(share * calls),
        "calls": calls,
        "attention_computed": 0,
        "attention_reused": 0,
        "flops": share,
        "flops_saved": 1 - share,
        "block_executions": round(share * calls * 6),
        "block_share": share,
        "metrics": {"psnr": float("inf") if setting == "uncached" else psnr},
    }


def flux_inputs(batch: int = 1, timestep: float = 1.0, seed: int = 0) -> dict[str, object]:
    """Keyword arguments for one call of `cachekit.testing.tiny_flux_transformer()`."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 16, 4, generator=generator),
        "encoder_hidden_states": torch.randn(batch, 4, 32, generator=generator),
        "pooled_projections": torch.randn(batch, 32, generator=generator),
        "timestep": torch.full((batch,), timestep),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(4, 3),
        "return_dict": False,
    }


#: decide(step, branch, probe, embedding) -> True to run the blocks, False to re-apply the residual.
Decide = Callable[[int, int, torch.Tensor, "torch.Tensor | None"], bool]


class StraightLineSpan(nn.Module):
    """All blocks as one, with the residual cache written out by hand."""

    def __init__(self, blocks: list[nn.Module], decide: Decide, branches: int, shared_residual: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.decide = decide
        self.branches = branches
        self.shared_residual = shared_residual  # the known bug, to show a comparison can fail
        self.calls = 0
        self.embedding: torch.Tensor | None = None  # set by a hook on the model's timestep embedder
        self.residuals: dict[int, tuple[torch.Tensor, ...]] = {}
        self.schedule: dict[int, list[bool]] = {}

    def run(self, streams, probe, block_call):
        step, branch = divmod(self.calls, self.branches)
        self.calls += 1
        key = 0 if self.shared_residual else branch
        compute = self.decide(step, branch, probe, self.embedding)
        self.schedule.setdefault(branch, []).append(compute)
        if compute:
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

        probe = self.blocks[0].norm1(hidden_states, emb=temb)[0]
        hidden, encoder = self.run((hidden_states, encoder_hidden_states), probe, call)
        return encoder, hidden


class WanStraightLine(StraightLineSpan):
    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        def call(block, streams):
            return (block(streams[0], encoder_hidden_states, temb, rotary_emb),)

        first = self.blocks[0]
        shift, scale = (first.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
        probe = first.norm1(hidden_states.float()) * (1 + scale) + shift
        return self.run((hidden_states,), probe, call)[0]


def install_straight_line(transformer, decide: Decide, branches=2, shared_residual=False) -> StraightLineSpan:
    """Replace `transformer`'s blocks by the reference span (Flux or Wan)."""
    if hasattr(transformer, "single_transformer_blocks"):
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        span: StraightLineSpan = FluxStraightLine(blocks, decide, branches, shared_residual)
        transformer.transformer_blocks = nn.ModuleList([span])
        transformer.single_transformer_blocks = nn.ModuleList()
        embedder, index = transformer.time_text_embed, None
    else:
        span = WanStraightLine(list(transformer.blocks), decide, branches, shared_residual)
        transformer.blocks = nn.ModuleList([span])
        embedder, index = transformer.condition_embedder, 0

    def keep_embedding(module, args, output):
        span.embedding = output if index is None else output[index]

    embedder.register_forward_hook(keep_embedding)
    return span
