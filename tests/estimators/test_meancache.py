"""MeanCache's average velocity against the paper's equations written out here: on a tiny trained
model's Euler trajectory (where the average comes from the latents, as MeanCache computes it), and
through the runtime on a real pipeline's span residuals; and the trajectory contract's errors."""

from __future__ import annotations

from typing import ClassVar, Literal

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import cachekit
from cachekit import testbed
from cachekit.errors import EstimatorError, MissingPointError
from cachekit.estimator import Estimator, Kept
from cachekit.hookspecs import hookimpl
from cachekit.registry import get_estimator
from cachekit.schemas import MeanCacheConfig, ScheduleConfig
from cachekit.schemas.estimators import EstimatorConfig
from cachekit.strategy import Step
from cachekit.testing import run_wan, tiny_flux_transformer, tiny_wan_pipeline

MASK = "110100101001011"  # 15 steps, skipping runs of one and two


def paper_jvp(log: dict[str, list[torch.Tensor]], span: int) -> torch.Tensor:
    """MeanCache's JVP from the logged trajectory: the first velocity of the last `span` steps minus
    the average velocity the latents moved with over them, per unit of sigma."""
    last, first = len(log["v"]) - 1, len(log["v"]) - span
    moved = log["latents"][last] - log["latents_pre"][first]
    spanned = log["sigmas"][last] - log["sigmas_pre"][first]
    return (log["v"][first] - moved / spanned) / spanned


@pytest.mark.parametrize("span", [1, 2, 3])
def test_the_estimate_is_the_papers_average_velocity_on_a_trained_model(span):
    """Euler over 15 steps of wan-moving-digits (no CFG, float64): on skipped steps the paper uses
    v_last - JVP (next sigma - sigma) with the JVP measured on the latents; cachekit's estimator,
    given the computed velocities and the noise levels only, gives the same velocities."""
    pipe = testbed.load("wan-moving-digits").to(dtype=torch.float64)
    tokens, pooled = pipe.conditioning(torch.tensor([7]))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(len(MASK))
    sigmas = scheduler.sigmas.double().tolist()
    start = pipe.prepare_latents(0)

    def velocity(x: torch.Tensor, index: int) -> torch.Tensor:
        sigma = torch.full((1,), sigmas[index], dtype=torch.float64)
        return pipe.spec.velocity(pipe.transformer, x, sigma, tokens, pooled)

    with torch.no_grad():
        x, log = start.clone(), {"v": [], "latents_pre": [], "latents": [], "sigmas_pre": [], "sigmas": []}
        for index, compute in enumerate(MASK):
            if compute == "1":
                v = velocity(x, index)
            else:
                v = log["v"][-1] - paper_jvp(log, min(span, len(log["v"])) or 1) * (sigmas[index + 1] - sigmas[index])
            log["latents_pre"].append(x)
            log["sigmas_pre"].append(torch.tensor(sigmas[index], dtype=torch.float64))
            log["sigmas"].append(torch.tensor(sigmas[index + 1], dtype=torch.float64))
            log["v"].append(v)
            x = x + (sigmas[index + 1] - sigmas[index]) * v
            log["latents"].append(x)

        kept = Kept(get_estimator("meancache")(MeanCacheConfig(span=span)))
        y, ours = start.clone(), []
        for index, compute in enumerate(MASK):
            step = Step(index, len(MASK), 0.0, 0, sigma=sigmas[index], next_sigma=sigmas[index + 1])
            if compute == "1":
                v = velocity(y, index)
                kept.record(v, step)
            else:
                v = kept.estimate(step)
            ours.append(v)
            y = y + (sigmas[index + 1] - sigmas[index]) * v

    for index, (mine, paper) in enumerate(zip(ours, log["v"], strict=True)):
        torch.testing.assert_close(mine, paper, rtol=0, atol=1e-9, msg=f"step {index}")
    skipped = [index for index, compute in enumerate(MASK) if compute == "0"]
    copy = log["v"][skipped[0] - 1]
    assert span == 1 or not torch.allclose(ours[skipped[0]], copy)  # the correction is not a copy


@pytest.mark.parametrize("span", [2, 3])
def test_through_the_runtime_each_branch_gets_the_average_of_its_own_residuals(span):
    """Wan's pipeline (CFG as two calls, its flow-matching scheduler) under a schedule with meancache:
    the residual each skipped call of each branch adds equals the paper's rule applied to a
    trajectory driven by that branch's handed-out residuals, with the scheduler's sigmas."""
    pipe = tiny_wan_pipeline()
    first, last = pipe.transformer.blocks[0], pipe.transformer.blocks[-1]
    entered, handed = [], []
    hooks = [
        first.register_forward_pre_hook(lambda _m, args: entered.append(args[0])),
        last.register_forward_hook(lambda _m, _a, output: handed.append(output - entered[-1])),
    ]
    mask = MASK[:10]
    config = ScheduleConfig(mask=mask, estimator={"kind": "meancache", "span": span})
    with cachekit.apply(pipe, config) as handle:
        run_wan(pipe, steps=len(mask))
    for hook in hooks:
        hook.remove()
    sigmas = pipe.scheduler.sigmas.tolist()
    assert handle.stats.last.branches[1].span_schedule == [c == "1" for c in mask]
    for branch in (0, 1):
        residuals = handed[branch::2]
        log: dict[str, list] = {"v": [], "latents_pre": [], "latents": [], "sigmas_pre": [], "sigmas": []}
        z = torch.zeros_like(residuals[0])  # the trajectory the residuals would drive
        for index, compute in enumerate(mask):
            if compute == "0":
                jvp = paper_jvp(log, min(span, len(log["v"])))
                expected = log["v"][-1] - jvp * (sigmas[index + 1] - sigmas[index])
                torch.testing.assert_close(residuals[index], expected, rtol=0, atol=1e-5)
            log["latents_pre"].append(z)
            log["sigmas_pre"].append(sigmas[index])
            log["sigmas"].append(sigmas[index + 1])
            log["v"].append(residuals[index])
            z = z + (sigmas[index + 1] - sigmas[index]) * residuals[index]
            log["latents"].append(z)


def test_without_a_scheduler_the_noise_levels_are_a_named_error():
    from helpers import flux_inputs

    model = tiny_flux_transformer()
    config = ScheduleConfig(mask="1010", num_inference_steps=4, estimator="meancache")
    with (
        cachekit.apply(model, config) as handle,
        pytest.raises(
            EstimatorError, match=r"reads each step's noise level \(sigma\).*apply the strategy to the pipeline"
        ),
    ):
        model(**flux_inputs(timestep=1.0))
    assert handle.stats.generations == []  # the refused call counted for nothing


def test_an_estimator_reading_the_latent_on_an_adapter_without_one_is_named(fresh_registry, monkeypatch):
    class LatentConfig(EstimatorConfig):
        kind: Literal["latent-reader"] = "latent-reader"

    class LatentReader(Estimator[LatentConfig]):
        config_class = LatentConfig
        trajectory: ClassVar[frozenset[str]] = frozenset({"latent"})

        def new_state(self):
            return {}

        def record(self, state, value, step):
            state["last"] = value

        def estimate(self, state, step):
            return state["last"]

        def kept(self, state):
            return [state["last"]]

    class Plugin:
        @hookimpl
        def cachekit_register_estimators(self, register):
            register(LatentReader)

    cachekit.register_plugin(Plugin(), "latent-reader")
    flux = fresh_registry.adapters["flux"]
    monkeypatch.setattr(flux, "missing", {**flux.missing, "latent": "its tokens carry no layout (a test's reason)"})
    with pytest.raises(
        MissingPointError,
        match=r"estimator 'latent-reader' needs the latent of each call, which the 'flux' adapter does not provide "
        r"for FluxTransformer2DModel: its tokens carry no layout \(a test's reason\)",
    ):
        cachekit.apply(
            tiny_flux_transformer(), {"strategy": "uniform", "num_inference_steps": 4, "estimator": "latent-reader"}
        )
