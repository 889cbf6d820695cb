"""What a strategy keeps is known before the device runs out: from the first computed call, checked
against `max_kept_bytes` and (on CUDA) the device's free memory; stored in a chosen dtype; the
strategy's own state reported beside the estimator's."""

from __future__ import annotations

import pytest
import torch
from helpers import flux_inputs

import cachekit
from cachekit.errors import KeptMemoryError
from cachekit.schemas import TeaCacheConfig, UniformConfig
from cachekit.testing import tiny_flux_transformer

STEPS = 4


def residual_bytes(model, dtype=torch.float32) -> int:
    """The span's residual on both streams (image and text tokens) at the blocks' width."""
    inputs = flux_inputs()
    tokens = inputs["hidden_states"].shape[1] + inputs["encoder_hidden_states"].shape[1]
    return tokens * model.inner_dim * torch.empty((), dtype=dtype).element_size()


def generate(model, branches=2):
    for index in range(STEPS):
        for _ in range(branches):
            model(**flux_inputs(timestep=1 - index / STEPS))


@pytest.mark.parametrize(("order", "slots"), [(1, 2), (2, 3)])
def test_more_than_max_kept_bytes_is_refused_at_the_first_computed_call(order, slots):
    """A Taylor forecast of order k will keep k + 1 residuals per branch; the first call keeps one:
    the error comes then, naming what it would keep, and the model is left computing nothing more."""
    model = tiny_flux_transformer()
    one = residual_bytes(model)
    config = UniformConfig(
        interval=2, num_inference_steps=STEPS, estimator={"kind": "taylor", "order": order}, max_kept_bytes=one
    )
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    with cachekit.apply(model, config), pytest.raises(KeptMemoryError) as error:
        generate(model)
    assert len(calls) == 1  # refused at the first call, before any further memory is taken
    message = str(error.value)
    assert f"would keep {slots * one / 1024:.2f} KiB" in message and "above max_kept_bytes" in message
    assert "span level" in message and "dtype='bfloat16'" in message


def test_a_limit_that_fits_every_branch_passes_and_the_stats_count_it_once_per_layout():
    model = tiny_flux_transformer()
    one = residual_bytes(model)
    config = UniformConfig(interval=2, num_inference_steps=STEPS, estimator={"kind": "taylor", "order": 1})
    with cachekit.apply(model, config.model_copy(update={"max_kept_bytes": 2 * 2 * one})) as handle:
        generate(model)
    for branch in handle.stats.last.branches.values():
        assert branch.kept_bytes == branch.peak_kept_bytes == 2 * one
    tight = config.model_copy(update={"max_kept_bytes": 2 * 2 * one - 1})
    with cachekit.apply(model, tight), pytest.raises(KeptMemoryError, match=r"per CFG branch x 2"):
        generate(model)  # the second branch tips it over


def test_the_storage_dtype_halves_what_is_kept_and_estimates_come_back_in_the_model_s_dtype():
    model = tiny_flux_transformer()
    outputs = {}
    for dtype in (None, "bfloat16"):
        config = UniformConfig(interval=2, num_inference_steps=STEPS, estimator={"kind": "copy", "dtype": dtype})
        with cachekit.apply(model, config) as handle:
            outputs[dtype] = [model(**flux_inputs(timestep=1 - i / STEPS))[0] for i in range(STEPS)]
        branch = handle.stats.last.branches[0]
        assert branch.kept_bytes == residual_bytes(model, torch.bfloat16 if dtype else torch.float32)
    assert all(output.dtype == torch.float32 for output in outputs["bfloat16"])
    torch.testing.assert_close(outputs["bfloat16"], outputs[None], rtol=2e-2, atol=2e-2)
    assert not torch.equal(outputs["bfloat16"][1], outputs[None][1])  # the reused step did go through bf16


def test_float32_forecasts_of_a_bf16_model_keep_float32_factors():
    model = tiny_flux_transformer().to(torch.bfloat16)
    config = UniformConfig(
        interval=2, num_inference_steps=STEPS, estimator={"kind": "taylor", "order": 2, "dtype": "float32"}
    )
    with cachekit.apply(model, config) as handle:
        for index in range(STEPS):
            inputs = {
                k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in flux_inputs(timestep=1 - index / STEPS).items()
            }
            assert model(**inputs)[0].dtype == torch.bfloat16
    assert handle.stats.last.branches[0].kept_bytes == 3 * residual_bytes(model, torch.float32)


def test_the_strategy_s_own_state_is_reported():
    """TeaCache keeps the previous probe: the first block's modulated input, per branch."""
    model = tiny_flux_transformer()
    config = TeaCacheConfig(rel_l1_thresh=0.1, coefficients=(1.0, 0.0), num_inference_steps=STEPS)
    with cachekit.apply(model, config) as handle:
        generate(model)
    probe = flux_inputs()["hidden_states"].shape[1] * model.inner_dim * 4
    assert [branch.strategy_bytes for branch in handle.stats.last.branches.values()] == [probe, probe]
    assert "strategy state" in str(handle.stats)


def test_more_than_the_free_device_memory_is_refused(monkeypatch):
    """On CUDA the free memory is asked (here answered by a stand-in: CI has no GPU)."""
    from cachekit.runtime import memory

    model = tiny_flux_transformer()
    one = residual_bytes(model)
    monkeypatch.setattr(memory.torch.cuda, "mem_get_info", lambda device: (one, 10 * one))
    config = UniformConfig(interval=2, num_inference_steps=STEPS, estimator={"kind": "taylor", "order": 2})
    with cachekit.apply(model, config) as handle:
        runtime = handle._runtime
        original = runtime.frames.begin

        def on_cuda(*args, **kwargs):  # the call's latent as if on a GPU
            call = original(*args, **kwargs)
            call.device = torch.device("cuda", 0)
            return call

        runtime.frames.begin = on_cuda
        with pytest.raises(KeptMemoryError, match=r"more than the .* free on cuda:0"):
            generate(model)
