"""Flux (`FluxTransformer2DModel`): double-stream blocks, then single-stream blocks.

In diffusers both block kinds take and return the image and text streams separately, so the span
runs over all of them and caches a residual for each stream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from diffusers import FluxTransformer2DModel

from cachekit.adapter import Adapter, BlockStreams, ModuleSite, OutputSite, ResidualSpan, SiteKind, call_arg
from cachekit.hookspecs import hookimpl

# Both block kinds: (hidden_states, encoder_hidden_states, temb, ...) -> (encoder_hidden_states, hidden_states)
_STREAMS = BlockStreams(inputs=((0, "hidden_states"), (1, "encoder_hidden_states")), outputs=(1, 0))


class FluxAdapter(Adapter):
    name = "flux"
    model_class = FluxTransformer2DModel
    model: FluxTransformer2DModel

    def timestep(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
        # Flux pipelines pass t / 1000; the model multiplies it back.
        return call_arg(args, kwargs, 3, "timestep") * 1000

    def timestep_embedding(self) -> OutputSite:
        return OutputSite(self.model.time_text_embed)

    def span(self) -> ResidualSpan:
        return ResidualSpan(tuple((block, _STREAMS) for block in self.blocks()))

    def blocks(self) -> list[torch.nn.Module]:
        return [*self.model.transformer_blocks, *self.model.single_transformer_blocks]

    def probe(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
        first = self.model.transformer_blocks[0]
        hidden_states = call_arg(args, kwargs, 0, "hidden_states")
        temb = call_arg(args, kwargs, 2, "temb")
        return first.norm1(hidden_states, emb=temb)[0]

    def attention_sites(self) -> list[ModuleSite]:
        # Joint attention over image and text tokens: self-attention, there is no cross attention.
        return [
            ModuleSite(f"{name}.attn", block.attn, SiteKind.SPATIAL, index)
            for index, name, block in self._named_blocks()
        ]

    def mlp_sites(self) -> list[ModuleSite]:
        sites = []
        for index, name, block in self._named_blocks():
            if hasattr(block, "ff"):  # double-stream: one MLP per stream
                sites.append(ModuleSite(f"{name}.ff", block.ff, SiteKind.MLP, index))
                sites.append(ModuleSite(f"{name}.ff_context", block.ff_context, SiteKind.MLP, index))
            else:  # single-stream: the MLP's input projection runs beside attention
                sites.append(ModuleSite(f"{name}.proj_mlp", block.proj_mlp, SiteKind.MLP, index))
        return sites

    def _named_blocks(self) -> list[tuple[int, str, Any]]:
        names = [f"transformer_blocks.{i}" for i in range(len(self.model.transformer_blocks))]
        names += [f"single_transformer_blocks.{i}" for i in range(len(self.model.single_transformer_blocks))]
        return [(index, name, block) for index, (name, block) in enumerate(zip(names, self.blocks(), strict=True))]


@hookimpl
def cachekit_register_adapters(register: Callable[[type[Adapter]], None]) -> None:
    register(FluxAdapter)
