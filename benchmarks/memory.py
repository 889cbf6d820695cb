"""What each strategy keeps at full size, from the meta device (full-size shapes, no memory, no GPU):
FLUX.1-dev's transformer at 1024^2 and Wan2.1-T2V-14B's at 720p x 81 frames, in bf16, with CFG
as two calls. `python benchmarks/memory.py` (or `nox -s bench -- --memory`) prints the table.

The figures are cachekit's own projection (`handle.stats`: what every branch keeps once each site
holds what its estimator keeps at most), taken after two steps, and the strategy's own state.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from diffusers import FluxTransformer2DModel, WanTransformer3DModel

import cachekit
from cachekit.registry import make_config
from cachekit.testing import meta_reads

#: What the table covers: the span level with a copy and a forecast, the module levels, and the
#: strategies whose own state holds a tensor of the model's size.
SETTINGS: dict[str, dict[str, Any]] = {
    "uniform, copy (span)": {"strategy": "uniform"},
    "uniform, taylor 2 (span)": {"strategy": "uniform", "estimator": {"kind": "taylor", "order": 2}},
    "uniform, taylor 2 in float32 (span)": {
        "strategy": "uniform",
        "estimator": {"kind": "taylor", "order": 2, "dtype": "float32"},
    },
    "teacache (span + previous probe)": {"strategy": "teacache", "coefficients": [1.0, 0.0], "rel_l1_thresh": 0.1},
    "fbcache (span + first block's residual)": {"strategy": "fbcache"},
    "magcache (span)": {"strategy": "magcache", "mag_ratios": [1.0, 1.0], "interpolate": True},
    "seacache (span, taylor 1)": {"strategy": "seacache"},
    "easycache (span + latents and outputs)": {"strategy": "easycache"},
    "pab (attention and MLP outputs)": {"strategy": "pab"},
    "taylorseer, attention (its default)": {"strategy": "taylorseer"},
    "taylorseer, modules": {"strategy": "taylorseer", "level": "modules"},
    "fastercache (self-attention outputs, conditional branch)": {
        "strategy": "fastercache",
        "branches": {"estimator": "copy"},
    },
}


def flux() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    with torch.device("meta"):
        model = FluxTransformer2DModel(
            num_layers=19, num_single_layers=38, guidance_embeds=True, axes_dims_rope=(16, 56, 56)
        ).to(torch.bfloat16)
        side, text = 64, 512  # 1024^2
        inputs = {
            "hidden_states": torch.empty(1, side * side, 64, dtype=torch.bfloat16),
            "encoder_hidden_states": torch.empty(1, text, 4096, dtype=torch.bfloat16),
            "pooled_projections": torch.empty(1, 768, dtype=torch.bfloat16),
            "guidance": torch.empty(1, dtype=torch.bfloat16),
            "img_ids": torch.empty(side * side, 3),
            "txt_ids": torch.empty(text, 3),
        }
    return model, inputs


def wan_14b() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    with torch.device("meta"):
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=40,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=13824,
            num_layers=40,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=1024,
        ).to(torch.bfloat16)
        inputs = {
            "hidden_states": torch.empty(1, 16, 21, 90, 160, dtype=torch.bfloat16),  # 720p x 81 frames
            "encoder_hidden_states": torch.empty(1, 512, 4096, dtype=torch.bfloat16),
        }
    return model, inputs


MODELS = {"FLUX.1-dev 1024^2": flux, "Wan2.1-T2V-14B 720p x 81": wan_14b}


def kept(model: torch.nn.Module, inputs: dict[str, torch.Tensor], setting: dict[str, Any]) -> tuple[int, int]:
    """(bytes the estimator will keep over both branches, bytes of the strategy's own state)."""
    config = make_config({**setting, "num_inference_steps": 4})
    with cachekit.apply(model, config) as handle, meta_reads(), torch.no_grad():
        for index in range(2):
            for branch in ("cond", "uncond"):
                with model.cache_context(branch, step_index=index, num_inference_steps=4, timestep=900.0 - index):
                    model(timestep=torch.full((1,), 0.9 - index / 10, device="meta"), **inputs)
        projected, _ = handle._runtime.memory.projected()
    strategy = sum(branch.strategy_bytes for branch in handle.stats.last.branches.values())
    return projected, strategy


def table() -> str:
    lines = ["| setting | " + " | ".join(MODELS) + " |", "|---|" + "---|" * len(MODELS)]
    built = {name: build() for name, build in MODELS.items()}
    for label, setting in SETTINGS.items():
        cells = []
        for model, inputs in built.values():
            values, state = kept(model, inputs, setting)
            cells.append(f"{values / 2**30:.2f} GiB" + (f" + {state / 2**30:.2f} GiB state" if state else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    print(table())


if __name__ == "__main__":
    main()
