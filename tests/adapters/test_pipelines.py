"""Each family's real diffusers pipeline drives its transformer through the adapter's idea of the
timestep: text encoders and VAE left out (prompt embeddings in, latents out), a uniform strategy
must see one generation of exactly the scheduled steps, in order, per CFG branch. A timestep read
on the wrong scale or in the wrong direction (Mochi and Lumina2 run theirs backwards) would
split the loop into many generations or merge steps into branches. (Flux and Wan run whole
pipelines elsewhere; Cosmos' pipeline needs its guardrail package, and Allegro's does not run
without its VAE's config.)"""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    CogVideoXDDIMScheduler,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

import cachekit
from cachekit import registry

STEPS = 6


def skipped(encoders: int = 1) -> dict[str, None]:
    """No VAE and no text encoders or tokenizers (`text_encoder`, `text_encoder_2`, ...)."""
    suffixes = ["", *(f"_{index}" for index in range(2, encoders + 1))]
    return {"vae": None} | {f"{part}{suffix}": None for suffix in suffixes for part in ("text_encoder", "tokenizer")}


def embeds(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))


def with_mask(length, dim, mask_dtype=torch.float32, **extra):
    """Prompt and negative-prompt embeddings with their attention masks."""
    mask = torch.ones(1, length, dtype=mask_dtype)
    return {
        "prompt_embeds": embeds(1, length, dim),
        "prompt_attention_mask": mask,
        "negative_prompt_embeds": embeds(1, length, dim),
        "negative_prompt_attention_mask": mask,
        **extra,
    }


def plain(length, dim, **extra):
    return {"prompt_embeds": embeds(1, length, dim), "negative_prompt_embeds": embeds(1, length, dim), **extra}


SMALL = {"height": 16, "width": 16}  # pixels: 2x2 latents at the usual VAE factor of 8
PIPELINES = {
    # adapter: (pipeline class, scheduler, components besides transformer and scheduler, call arguments)
    "chroma": (
        diffusers.ChromaPipeline,
        FlowMatchEulerDiscreteScheduler(),
        skipped(),
        with_mask(6, 32, height=32, width=32, guidance_scale=3.0),
    ),
    "cogview4": (
        diffusers.CogView4Pipeline,
        FlowMatchEulerDiscreteScheduler(),
        skipped(),
        plain(6, 8, height=32, width=32),
    ),
    "lumina2": (
        diffusers.Lumina2Pipeline,
        FlowMatchEulerDiscreteScheduler(),
        skipped(),
        with_mask(6, 8, mask_dtype=torch.bool, height=16, width=16),
    ),
    "qwenimage": (
        diffusers.QwenImagePipeline,
        FlowMatchEulerDiscreteScheduler(),
        skipped(),
        {
            "prompt_embeds": embeds(1, 6, 16),
            "prompt_embeds_mask": torch.ones(1, 6, dtype=torch.long),
            "negative_prompt_embeds": embeds(1, 6, 16),
            "negative_prompt_embeds_mask": torch.ones(1, 6, dtype=torch.long),
            "true_cfg_scale": 3.0,
            "height": 32,
            "width": 32,
        },
    ),
    "sd3": (
        diffusers.StableDiffusion3Pipeline,
        FlowMatchEulerDiscreteScheduler(),
        skipped(encoders=3),
        plain(6, 16, pooled_prompt_embeds=embeds(1, 16), negative_pooled_prompt_embeds=embeds(1, 16), **SMALL),
    ),
    "pixart": (
        diffusers.PixArtSigmaPipeline,
        DPMSolverMultistepScheduler(),
        skipped(),
        with_mask(6, 32, negative_prompt=None, height=16, width=16, use_resolution_binning=False),
    ),
    "sana": (
        diffusers.SanaPipeline,
        DPMSolverMultistepScheduler(),
        skipped(),
        with_mask(6, 8, negative_prompt=None, height=32, width=32, use_resolution_binning=False),
    ),
    "dit": (
        diffusers.DiTPipeline,
        DDIMScheduler(),
        {"vae": AutoencoderKL(block_out_channels=[8], norm_num_groups=8, latent_channels=4, sample_size=16)},
        {"class_labels": [3], "guidance_scale": 4.0},
    ),
    "hidream": (
        diffusers.HiDreamImagePipeline,
        FlowMatchEulerDiscreteScheduler(),
        skipped(encoders=4),
        {
            "prompt_embeds_t5": embeds(1, 6, 8),
            "prompt_embeds_llama3": embeds(3, 1, 6, 4),
            "pooled_prompt_embeds": embeds(1, 8),
            "negative_prompt_embeds_t5": embeds(1, 6, 8),
            "negative_prompt_embeds_llama3": embeds(3, 1, 6, 4),
            "negative_pooled_prompt_embeds": embeds(1, 8),
            "height": 32,
            "width": 32,
        },
    ),
    "hunyuan_video": (
        diffusers.HunyuanVideoPipeline,
        FlowMatchEulerDiscreteScheduler(),
        skipped(encoders=2),
        {
            "prompt_embeds": embeds(1, 6, 16),
            "pooled_prompt_embeds": embeds(1, 8),
            "prompt_attention_mask": torch.ones(1, 6),
            "num_frames": 5,
            **SMALL,
        },
    ),
    "skyreels_v2": (
        diffusers.SkyReelsV2Pipeline,
        UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        skipped(),
        plain(8, 16, num_frames=5, **SMALL),
    ),
    "cogvideox": (
        diffusers.CogVideoXPipeline,
        CogVideoXDDIMScheduler(),
        skipped(),
        plain(8, 8, num_frames=5, **SMALL),
    ),
    "ltx": (
        diffusers.LTXPipeline,
        FlowMatchEulerDiscreteScheduler(),
        skipped(),
        with_mask(6, 16, num_frames=9, height=32, width=32),
    ),
    "mochi": (
        diffusers.MochiPipeline,
        FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
        skipped(),
        with_mask(6, 16, num_frames=7, **SMALL),
    ),
    "latte": (
        diffusers.LattePipeline,
        DDIMScheduler(),
        skipped(),
        plain(6, 8, negative_prompt=None, video_length=2, **SMALL),
    ),
}


@pytest.mark.parametrize("adapter_name", sorted(PIPELINES))
def test_the_pipeline_runs_one_generation_of_its_scheduled_steps(adapter_name):
    pipeline_class, scheduler, components, arguments = PIPELINES[adapter_name]
    example = registry.registry().adapters[adapter_name].example()
    pipe = pipeline_class(transformer=example.model, scheduler=scheduler, **components)
    pipe.set_progress_bar_config(disable=True)
    adapter = registry.resolve_adapter(example.model)(example.model)
    seen: list[float] = []  # each call's timestep as the adapter reads it, outside cachekit
    reading = example.model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(adapter.step_of(args, kwargs)), with_kwargs=True
    )
    with cachekit.apply(pipe, {"strategy": "uniform", "interval": 2}) as handle, torch.no_grad():
        pipe(num_inference_steps=STEPS, output_type="latent", **arguments)
    reading.remove()

    # the adapter says whether the steps' timesteps may come from the scheduler: they must be the calls'
    scheduled = [adapter.scheduled(float(t)) for t in pipe.scheduler.timesteps for _ in range(len(seen) // STEPS)]
    same = all(abs(a - b) <= 1e-2 * max(abs(b), 1.0) for a, b in zip(seen, scheduled, strict=True))
    assert same and adapter.schedule_timesteps in ("timestep", "argument")
    assert len(handle.stats.generations) == 1
    generation = handle.stats.last
    assert generation.num_steps == STEPS
    assert generation.branches  # CFG batched into one call (one branch) or run as two calls
    for branch in generation.branches.values():
        assert branch.calls == STEPS
        # interval 2: steps 0, 2, 4 and the last computed, in the scheduler's order
        assert branch.span_schedule == [True, False, True, False, True, True]
