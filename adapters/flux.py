"""Flux (`FluxTransformer2DModel`): double-stream blocks, then single-stream blocks.

In diffusers both block kinds take and return the image and text streams separately, so the span
runs over all of them and caches a residual for each stream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from diffusers import FluxTransformer2DModel

from cachekit.adapter import Adapter, AttentionKind, AttentionSite, BlockStreams, ResidualSpan, call_arg
from cachekit.hookspecs import hookimpl

# Both block kinds: (hidden_states, encoder_hidden_states, temb, ...) -> (encoder_hidden_states, hidden_states)
_STREAMS = BlockStreams(inputs=((0, "hidden_states"), (1, "encoder_hidden_states")), outputs=(1, 0))


class FluxAdapter(Adapter):
    name = "flux"
    model_class = FluxTransformer2DModel
    model: FluxTransformer2DModel

    def timestep(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
        return call_arg(args, kwargs, 3, "timestep")

    def span(self) -> ResidualSpan:
        blocks = [*self.model.transformer_blocks, *self.model.single_transformer_blocks]
        return ResidualSpan(tuple((block, _STREAMS) for block in blocks))

    def probe(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
        first = self.model.transformer_blocks[0]
        hidden_states = call_arg(args, kwargs, 0, "hidden_states")
        temb = call_arg(args, kwargs, 2, "temb")
        return first.norm1(hidden_states, emb=temb)[0]

    def attention_sites(self) -> list[AttentionSite]:
        # Joint attention over image and text tokens: self-attention, there is no cross attention.
        return [
            AttentionSite(f"{blocks}.{index}.attn", block.attn, AttentionKind.SPATIAL)
            for blocks in ("transformer_blocks", "single_transformer_blocks")
            for index, block in enumerate(getattr(self.model, blocks))
        ]


@hookimpl
def cachekit_register_adapters(register: Callable[[type[Adapter]], None]) -> None:
    register(FluxAdapter)
