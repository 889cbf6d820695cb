"""Tiny diffusers models and pipelines with random weights, built offline in a second.

For tests of cachekit and of plugins: real diffusers classes, so every hook and call path is the
one a full-size model takes. The pipelines need `transformers` (the ``pipelines`` extra). Random
weights have no denoising dynamics: use them to test plumbing, never to rank strategies. Also two
ways of looking at a model from the outside, independently of cachekit: `module_state` and
`RunCounter`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from torch import nn

from cachekit import signals

_LETTERS = [chr(code) for code in range(ord("a"), ord("z") + 1)]


def tiny_flux_transformer(
    seed: int = 0, num_layers: int = 1, num_single_layers: int = 2, **config: Any
) -> FluxTransformer2DModel:
    """`config` overrides or extends the tiny config (e.g. guidance_embeds=True)."""
    from cachekit.adapters.flux import TINY_FLUX

    torch.manual_seed(seed)
    layers = {"num_layers": num_layers, "num_single_layers": num_single_layers}
    return FluxTransformer2DModel(**{**TINY_FLUX, **layers, **config}).eval()


def tiny_wan_transformer(seed: int = 0, num_layers: int = 2, **config: Any) -> WanTransformer3DModel:
    """`config` overrides the tiny config (e.g. in_channels=12 for image-to-video)."""
    torch.manual_seed(seed)
    from cachekit.adapters.wan import TINY_WAN

    return WanTransformer3DModel(**{**TINY_WAN, **config, "num_layers": num_layers}).eval()


def _t5_tokenizer() -> Any:
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    return T5Tokenizer(vocab=pieces + [(letter, -1.0) for letter in _LETTERS])


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A FluxPipeline for 32x32 images (64 image tokens) that supports true CFG."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    transformer = tiny_flux_transformer(seed)
    torch.manual_seed(seed)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            projection_dim=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)).eval()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in _LETTERS:
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
    ).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=clip,
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
        text_encoder_2=t5,
        tokenizer_2=_t5_tokenizer(),
        vae=vae,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan_pipeline(seed: int = 0, two_experts: bool = False) -> WanPipeline:
    """A WanPipeline for 5 frames of 16x16 (2 latent frames, 32 video tokens) with CFG.

    `two_experts`: Wan 2.2's layout, `transformer` for timesteps >= 800 and `transformer_2` below.
    """
    transformer = tiny_wan_transformer(seed)
    transformer_2 = tiny_wan_transformer(seed + 1) if two_experts else None
    pipe = WanPipeline(
        **_wan_parts(seed),
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=0.8 if two_experts else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan_i2v_pipeline(seed: int = 0) -> WanImageToVideoPipeline:
    """A WanImageToVideoPipeline laid out as Wan 2.2's (no image encoder: the first frame's latent
    and its mask join the noise channels), for 5 frames of 16x16 with CFG. Needs `ftfy`."""
    transformer = tiny_wan_transformer(seed, in_channels=12)  # noise 4 + mask 4 + first frame 4
    pipe = WanImageToVideoPipeline(
        **_wan_parts(seed), transformer=transformer, image_encoder=None, image_processor=None
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _wan_parts(seed: int) -> dict[str, Any]:
    """The tokenizer, text encoder, VAE and scheduler of the tiny Wan pipelines."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=1000, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4)
    ).eval()
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()
    return {
        "tokenizer": _t5_tokenizer(),
        "text_encoder": text_encoder,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


def run_flux(pipe: FluxPipeline, steps: int = 8, seed: int = 0) -> torch.Tensor:
    """One generation with true CFG (cond and uncond as separate transformer calls)."""
    return pipe(
        "a red cat",
        negative_prompt="blurry",
        true_cfg_scale=3.0,
        num_inference_steps=steps,
        height=32,
        width=32,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


def run_wan(pipe: WanPipeline, steps: int = 8, seed: int = 0) -> torch.Tensor:
    """One generation with CFG (cond and uncond as separate transformer calls)."""
    return pipe(
        "a red cat",
        negative_prompt="blurry",
        guidance_scale=5.0,
        num_inference_steps=steps,
        height=16,
        width=16,
        num_frames=5,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).frames


def module_state(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """The instance attributes of every submodule: what apply/remove must leave as found."""
    return {name: tuple(sorted(vars(module))) for name, module in model.named_modules()}


class RunCounter:
    """Counts, per module, the calls in which its own computation ran.

    A call counts when at least one of the leaf submodules watched for it ran inside it (all its
    leaves, or those of `inner[module]`). A module that is itself a leaf counts each time its own
    `forward` runs: the counter wraps it before any hook is installed, so a hook that skips the
    module skips the wrapper too.
    """

    def __init__(self, modules: list[nn.Module], inner: dict[nn.Module, list[nn.Module]] | None = None) -> None:
        self.counts = [0] * len(modules)
        self._ran = [False] * len(modules)
        self._handles = []
        self._wrapped: list[nn.Module] = []
        for index, module in enumerate(modules):
            watched = (inner or {}).get(module, [module])
            leaves = [
                sub
                for part in watched
                for sub in part.modules()
                if sub is not module and next(sub.children(), None) is None
            ]
            if not leaves:
                self._wrap(module, index)
                continue
            self._handles.append(module.register_forward_pre_hook(self._enter(index)))
            self._handles += [leaf.register_forward_hook(self._leaf(index)) for leaf in leaves]
            self._handles.append(module.register_forward_hook(self._exit(index)))

    def _enter(self, index: int):
        def hook(*_: object) -> None:
            self._ran[index] = False

        return hook

    def _leaf(self, index: int):
        def hook(*_: object) -> None:
            self._ran[index] = True

        return hook

    def _exit(self, index: int):
        def hook(*_: object) -> None:
            self.counts[index] += self._ran[index]

        return hook

    def _wrap(self, module: nn.Module, index: int) -> None:
        forward = module.forward

        def counted(*args, **kwargs):
            self.counts[index] += 1
            return forward(*args, **kwargs)

        module.forward = counted
        self._wrapped.append(module)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._wrapped:
            del module.forward


#: Tensor methods that copy a device value to the host, making the host wait for the device.
SYNCING_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero")
#: torch functions that do.
SYNCING_FUNCTIONS = ("equal", "nonzero", "is_nonzero", "unique", "masked_select", "allclose")


class SyncCounter:
    """Counts, per call of `model`, the calls of tensor methods and functions that make the host
    wait for the device (`.item()`, `bool()`, `float()`, `.tolist()`, `torch.equal`, indexing with
    a boolean mask, ...). On a CPU nothing waits, but each of these would on a GPU: counting them
    is how tests see host syncs without one. Counts everything inside the model's calls, the
    model's own code included (diffusers' makes none), and nothing outside them."""

    def __init__(self, model: nn.Module) -> None:
        self.per_call: list[int] = []
        self._inside = False
        self._patched: list[tuple[Any, str, Any]] = []
        self._handles = [
            model.register_forward_pre_hook(self._enter, prepend=True),  # before cachekit's own
            model.register_forward_hook(self._exit),
        ]
        for name in SYNCING_METHODS:
            self._patch(torch.Tensor, name)
        for name in SYNCING_FUNCTIONS:
            self._patch(torch, name)
        for name in ("__getitem__", "__setitem__"):
            self._patch(torch.Tensor, name, only=_masks)

    def _patch(self, owner: Any, name: str, only: Any = None) -> None:
        original = getattr(owner, name)
        counter = self

        def counted(*args: Any, **kwargs: Any) -> Any:
            if counter._inside and (only is None or only(*args)):
                counter.per_call[-1] += 1
            return original(*args, **kwargs)

        self._patched.append((owner, name, owner.__dict__.get(name)))
        setattr(owner, name, counted)

    def _enter(self, *_: Any) -> None:
        self.per_call.append(0)
        self._inside = True

    def _exit(self, *_: Any) -> None:
        self._inside = False

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        for owner, name, own in reversed(self._patched):
            if own is None:
                delattr(owner, name)
            else:
                setattr(owner, name, own)

    def __enter__(self) -> SyncCounter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _masks(tensor: Any, index: Any, *_: Any) -> bool:
    """Whether indexing with `index` takes a boolean mask (which needs the mask's count)."""
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(item, torch.Tensor) and item.dtype == torch.bool for item in items)


@contextlib.contextmanager
def meta_reads() -> Iterator[None]:
    """Host reads of meta tensors (which hold no values) answer zeros, so a model on the meta
    device (full-size shapes, no memory) runs under a strategy whose signals read one value."""
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__float__", "__bool__")}

    def reader(name: str) -> Any:
        original = originals[name]

        def read(tensor: torch.Tensor, *args: Any) -> Any:
            if not tensor.is_meta:
                return original(tensor, *args)
            return {"tolist": [0.0] * tensor.numel(), "__bool__": False}.get(name, 0.0)

        return read

    for name in originals:
        setattr(torch.Tensor, name, reader(name))
    signals._meta_reads[0] = True
    try:
        yield
    finally:
        signals._meta_reads[0] = False
        for name in originals:
            delattr(torch.Tensor, name)
