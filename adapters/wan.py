"""Wan 2.1 (`WanTransformer3DModel`): one list of blocks with self and cross attention.

The blocks carry only the video tokens (the text context enters each block unchanged), and the
probe is rebuilt from block 0's `scale_shift_table` and the projected timestep, as the block does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from diffusers import WanTransformer3DModel

from cachekit.adapter import Adapter, BlockStreams, ModuleSite, OutputSite, ResidualSpan, SiteKind, call_arg
from cachekit.hookspecs import hookimpl

# (hidden_states, encoder_hidden_states, temb, rotary_emb) -> hidden_states
_STREAMS = BlockStreams(inputs=((0, "hidden_states"),))


class WanAdapter(Adapter):
    name = "wan"
    model_class = WanTransformer3DModel
    model: WanTransformer3DModel

    def timestep(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
        return call_arg(args, kwargs, 1, "timestep")

    def timestep_embedding(self) -> OutputSite:
        # condition_embedder returns (temb, timestep_proj, text, image); temb is the embedding.
        return OutputSite(self.model.condition_embedder, index=0)

    def span(self) -> ResidualSpan:
        return ResidualSpan(tuple((block, _STREAMS) for block in self.model.blocks))

    def blocks(self) -> list[torch.nn.Module]:
        return list(self.model.blocks)

    def probe(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
        first = self.model.blocks[0]
        hidden_states = call_arg(args, kwargs, 0, "hidden_states")
        temb = call_arg(args, kwargs, 2, "temb").float()
        if temb.ndim == 4:  # per-token timesteps (Wan 2.2 TI2V): batch, tokens, 6, dim
            shift, scale = (first.scale_shift_table.unsqueeze(0) + temb).chunk(6, dim=2)[:2]
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:  # batch, 6, dim
            shift, scale = (first.scale_shift_table + temb).chunk(6, dim=1)[:2]
        return first.norm1(hidden_states.float()) * (1 + scale) + shift

    def attention_sites(self) -> list[ModuleSite]:
        # attn1 attends over all video tokens at once: spatial and temporal are not separate.
        sites = []
        for index, block in enumerate(self.model.blocks):
            sites.append(ModuleSite(f"blocks.{index}.attn1", block.attn1, SiteKind.SPATIAL, index))
            sites.append(ModuleSite(f"blocks.{index}.attn2", block.attn2, SiteKind.CROSS, index))
        return sites

    def mlp_sites(self) -> list[ModuleSite]:
        return [ModuleSite(f"blocks.{i}.ffn", block.ffn, SiteKind.MLP, i) for i, block in enumerate(self.model.blocks)]


@hookimpl
def cachekit_register_adapters(register: Callable[[type[Adapter]], None]) -> None:
    register(WanAdapter)
