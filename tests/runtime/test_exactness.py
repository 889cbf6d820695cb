"""A strategy that never reuses changes nothing, and removing it restores the model exactly."""

from __future__ import annotations

import torch
from helpers import module_state

import cachekit
from cachekit.schemas import UniformConfig


def test_never_reusing_strategy_is_bitwise_exact_and_remove_restores(family):
    pipe, run, _ = family
    reference = run(pipe)
    before = module_state(pipe.transformer)
    scheduler_before = sorted(vars(pipe.scheduler))

    handle = cachekit.apply(pipe, UniformConfig(interval=1))
    cached = run(pipe)
    stats = handle.stats.last
    handle.remove()
    restored = run(pipe)

    assert torch.equal(cached, reference)
    assert torch.equal(restored, reference)
    assert stats.num_steps == 8
    assert sorted(stats.branches) == [0, 1]  # cond and uncond, run as two calls per step
    for branch in stats.branches.values():
        assert branch.calls == 8
        assert (branch.sites["span"].computed, branch.sites["span"].reused) == (8, 0)
    # Nothing left behind: no hook registry, no instance `forward`, no scheduler wrapper.
    assert module_state(pipe.transformer) == before
    assert sorted(vars(pipe.scheduler)) == scheduler_before
    for module in pipe.transformer.modules():
        assert "forward" not in vars(module)


def test_remove_on_a_fresh_model_leaves_no_hook_registry(family):
    pipe, _, _ = family
    before = module_state(pipe.transformer)
    assert all("_diffusers_hook" not in attrs for attrs in before.values())
    cachekit.apply(pipe.transformer, UniformConfig(interval=2, num_inference_steps=4)).remove()
    assert module_state(pipe.transformer) == before


def test_removal_keeps_hooks_diffusers_put_there(flux_pipe):
    """cachekit's hooks stack with diffusers' own; removing ours leaves theirs working."""
    from diffusers.hooks import HookRegistry, ModelHook

    class Scale(ModelHook):
        def post_forward(self, module, output):
            return output * 2

    proj_out = flux_pipe.transformer.proj_out
    HookRegistry.check_if_exists_or_initialize(proj_out).register_hook(Scale(), "scale")
    block = flux_pipe.transformer.transformer_blocks[0]
    HookRegistry.check_if_exists_or_initialize(block).register_hook(ModelHook(), "user")
    x = torch.randn(2, 3, proj_out.in_features)
    state = module_state(flux_pipe.transformer)

    with cachekit.apply(flux_pipe, UniformConfig(interval=2)):
        pass

    assert module_state(flux_pipe.transformer) == state
    assert block._diffusers_hook.get_hook("user") is not None
    assert torch.equal(proj_out(x), proj_out.__class__.forward(proj_out, x) * 2)
