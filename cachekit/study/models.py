"""What a study generates with: a testbed model or a diffusers pipeline, behind one interface.

Both generate from (seed, condition) with the initial noise fixed by the seed, so every strategy
of a study starts from the same latents. The arguments a spec passes to a pipeline's call are
checked against that call's signature, from the pipeline folder's `model_index.json` before any
model loads where it can be read, else once the pipeline is loaded.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from cachekit.errors import CachekitError
from cachekit.metric import local_file
from cachekit.schemas.study import Generation

#: Called after each step with its index and the latents it made; returns replacements, or None.
OnStep = Callable[[int, torch.Tensor], "torch.Tensor | None"]
#: Spec fields and the pipeline argument each one sets.
ARGUMENTS = {
    "guidance_scale": "guidance_scale",
    "height": "height",
    "width": "width",
    "frames": "num_frames",
    "negative_prompt": "negative_prompt",
    "true_cfg_scale": "true_cfg_scale",
    "image": "image",
}
#: Set at the top level of a study, these apply only to the models whose pipeline takes them.
SHAPES = ("height", "width", "frames")
#: Arguments a study sets itself, for every cell alike.
RESERVED = ("prompt", "labels", "seed", "num_inference_steps", "generator", "latents", "output_type", "return_dict")


class PipelineArgumentError(CachekitError, ValueError):
    """A spec asks a pipeline's call for an argument it does not take."""


@dataclass(frozen=True)
class CallSignature:
    """What a pipeline's `__call__` takes."""

    pipeline: str  # the class name, for messages
    names: frozenset[str]
    anything: bool  # it takes **kwargs

    @classmethod
    def of(cls, pipeline: type) -> CallSignature:
        parameters = list(inspect.signature(pipeline.__call__).parameters.values())[1:]
        return cls(
            pipeline.__name__,
            frozenset(p.name for p in parameters if p.kind is not p.VAR_KEYWORD),
            any(p.kind is p.VAR_KEYWORD for p in parameters),
        )

    def takes(self, name: str) -> bool:
        return self.anything or name in self.names


def call_arguments(
    generation: Generation, signature: CallSignature, own: frozenset[str] = frozenset(), where: str = "the spec"
) -> dict[str, Any]:
    """The arguments `generation` passes to the pipeline's call, checked against `signature`.

    `own`: the settings given for this model alone (a top-level height, width or frames is left
    out where the pipeline takes none; one given for the model is not)."""
    arguments: dict[str, Any] = {}
    for field, argument in ARGUMENTS.items():
        value = getattr(generation, field)
        if value is None:
            continue
        if not signature.takes(argument):
            if field in SHAPES and field not in own:
                continue
            raise PipelineArgumentError(_not_taken(f"{field} (its {argument!r} argument)", signature, where))
        arguments[argument] = value
    for name, value in generation.pipeline_kwargs.items():
        if name in RESERVED or name in ARGUMENTS.values():
            reason = "the study sets it for every cell" if name in RESERVED else "set it as a setting of its own"
            raise PipelineArgumentError(f"{where}: pipeline_kwargs.{name}: {reason}")
        if not signature.takes(name):
            raise PipelineArgumentError(_not_taken(f"pipeline_kwargs.{name}", signature, where))
        arguments[name] = value
    if "image" in arguments and not Path(arguments["image"]).is_file():
        raise PipelineArgumentError(f"{where}: image {arguments['image']!r}: no such file")
    return arguments


def _not_taken(what: str, signature: CallSignature, where: str) -> str:
    takes = sorted(signature.names - set(RESERVED))
    close = difflib.get_close_matches(what.split(".")[-1].split(" ")[0], takes, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{where}: {signature.pipeline} does not take {what}{hint}; it takes: {', '.join(takes)}"


def pipeline_class(name: str) -> type | None:
    """The pipeline class model `name` loads as, without loading it: the testbed's, or the one a
    local folder's (or the hub cache's) model_index.json names; None where it cannot be known yet."""
    from cachekit import testbed

    if name in testbed.names():
        from cachekit.testbed.pipeline import TestbedPipeline

        return TestbedPipeline
    index = model_index(name)
    return None if index is None else _diffusers_class(index.get("_class_name"))


def skeleton(name: str) -> Any | None:
    """What `cachekit.apply` reads of the pipeline `name` loads as, without its weights: its
    transformers built on the meta device from their configs, and its scheduler. The testbed's
    pipelines are small enough to load whole. None where the configs cannot be read locally."""
    from cachekit import testbed

    if name in testbed.names():
        return testbed.load(name)
    components = model_index(name)
    if components is None:
        return None
    parts: dict[str, Any] = {}
    for component, config_name in [
        ("transformer", "config.json"),
        ("transformer_2", "config.json"),
        ("scheduler", "scheduler_config.json"),
    ]:
        library_and_class = components.get(component)
        config = local_file(name, f"{component}/{config_name}")
        if not isinstance(library_and_class, list) or library_and_class[1] is None or config is None:
            continue
        found = _diffusers_class(library_and_class[1])
        if found is None:
            return None
        with torch.device("meta"):
            parts[component] = found.from_config(json.loads(config.read_text()))
    return SimpleNamespace(**parts) if "transformer" in parts else None


def model_index(name: str) -> dict[str, Any] | None:
    """A pipeline's model_index.json (its class and components), where it can be read locally."""
    index = local_file(name, "model_index.json")
    return None if index is None else json.loads(index.read_text())


def _diffusers_class(name: Any) -> Any:
    """The diffusers class of that name, or None."""
    import diffusers

    return getattr(diffusers, str(name), None)


class StudyModel:
    """A model under study: `target` is what `cachekit.apply` takes."""

    def __init__(self, name: str, target: Any, spec: Generation, own: frozenset[str] = frozenset()) -> None:
        self.name = name
        self.target = target
        self.spec = spec
        self.arguments = call_arguments(spec, CallSignature.of(type(target)), own, f"model {name!r}")

    @property
    def transformer(self) -> torch.nn.Module:
        return self.target.transformer

    def identity(self) -> str:
        """Its transformer's identity (`Adapter.identity()`), which tuned settings are kept for."""
        from cachekit.registry import resolve_adapter

        return resolve_adapter(self.transformer)(self.transformer).identity()

    def generate(
        self, seed: int, condition: str, steps: int | None = None, on_step: OnStep | None = None
    ) -> torch.Tensor:
        """One generation from the seed's initial noise (`steps`: the spec's unless given).
        `on_step(index, latents)`: after each step, with the latents it made; what it returns
        (unless None) replaces them."""
        raise NotImplementedError


class TestbedModel(StudyModel):
    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, name: str, spec: Generation, own: frozenset[str] = frozenset(), trained: bool = True) -> None:
        from cachekit import testbed

        pipe = testbed.load(name, trained=trained).to(spec.device, getattr(torch, spec.dtype))
        super().__init__(name, pipe, spec, own)
        self._latents: dict[int, torch.Tensor] = {}

    def generate(
        self, seed: int, condition: str, steps: int | None = None, on_step: OnStep | None = None
    ) -> torch.Tensor:
        if seed not in self._latents:  # made once per seed, shared by every strategy
            self._latents[seed] = self.target.prepare_latents(seed)
        return self.target(
            [int(condition)],
            latents=self._latents[seed],
            num_inference_steps=steps or self.spec.steps,
            **_callback(on_step),
            **self.arguments,
        )


class DiffusersModel(StudyModel):
    """A diffusers pipeline from a hub id or a local folder; outputs scaled to [-1, 1]."""

    def __init__(self, name: str, spec: Generation, own: frozenset[str] = frozenset()) -> None:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(name, dtype=getattr(torch, spec.dtype))
        if spec.offload == "model":
            pipe.enable_model_cpu_offload(device=spec.device)
        elif spec.offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=spec.device)
        else:
            pipe.to(spec.device)
        pipe.set_progress_bar_config(disable=True)
        super().__init__(name, pipe, spec, own)
        if "image" in self.arguments:
            from PIL import Image

            with Image.open(self.arguments["image"]) as image:
                self.arguments["image"] = image.convert("RGB")

    def generate(
        self, seed: int, condition: str, steps: int | None = None, on_step: OnStep | None = None
    ) -> torch.Tensor:
        result = self.target(
            prompt=condition,
            num_inference_steps=steps or self.spec.steps,
            generator=torch.Generator(self.spec.device).manual_seed(seed),
            output_type="pt",
            **_callback(on_step),
            **self.arguments,
        )
        output = result.frames if hasattr(result, "frames") else result.images
        if output.ndim == 5:  # video pipelines return (B, F, C, H, W)
            output = output.transpose(1, 2)
        return output.float() * 2 - 1


def _callback(on_step: OnStep | None) -> dict[str, Any]:
    """`on_step` as the pipeline argument diffusers' pipelines (and the testbed's) take."""
    if on_step is None:
        return {}

    def callback(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        replaced = on_step(index, tensors["latents"])
        return tensors if replaced is None else {**tensors, "latents": replaced}

    return {"callback_on_step_end": callback}


def load_model(name: str, spec: Generation, own: frozenset[str] = frozenset()) -> StudyModel:
    from cachekit import testbed

    with on_device(spec.device):
        return TestbedModel(name, spec, own) if name in testbed.names() else DiffusersModel(name, spec, own)


@contextlib.contextmanager
def on_device(device: str) -> Iterator[None]:
    """Make `device` current while a model loads or runs on it ("cuda:1" as much as "cuda")."""
    if device.startswith("cuda"):
        with torch.cuda.device(torch.device(device)):
            yield
    else:
        yield
