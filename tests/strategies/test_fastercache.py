"""FasterCache against diffusers' FasterCacheConfig (batched CFG, where diffusers runs it), and with
CFG as two calls (where diffusers cannot)."""

from __future__ import annotations

import torch
from diffusers import FasterCacheConfig as DiffusersFasterCache
from diffusers import apply_faster_cache

import cachekit
from cachekit import testbed
from cachekit.schemas import FasterCacheConfig
from cachekit.testing import run_wan, tiny_wan_pipeline

STEPS = 30


class Watch:
    """Per transformer call: the batch block 0 ran on, whether its self-attention computed, and the
    prediction."""

    def __init__(self, model):
        block = model.blocks[0]
        self.calls: list[list] = []
        self._handles = [
            model.register_forward_hook(lambda _m, _a, output: self.calls[-1].append(output[0].clone())),
            model.register_forward_pre_hook(lambda *_: self.calls.append([None, False])),
            block.register_forward_pre_hook(self._block, with_kwargs=True),
            block.attn1.to_q.register_forward_hook(self._attention),
        ]

    def _block(self, _module, args, kwargs):
        self.calls[-1][0] = (args[0] if args else kwargs["hidden_states"]).shape[0]

    def _attention(self, *_):
        self.calls[-1][1] = True

    def close(self):
        for handle in self._handles:
            handle.remove()

    def schedule(self):
        return [(batch, attention) for batch, attention, _ in self.calls]


def compare(generate, model, with_cachekit, with_diffusers):
    """Diffusers' FasterCache on a generation, then cachekit's on the same generation twice: free, and
    teacher-forced (the latents after every step replaced by diffusers'), so that every call of the
    forced run sees the inputs diffusers' call saw. (final output, watch) for each."""
    runs = {}
    for name, attach, forced in (
        ("diffusers", with_diffusers, None),
        ("cachekit", with_cachekit, None),
        ("forced", with_cachekit, "diffusers"),
    ):
        detach = attach()
        watch = Watch(model)
        trajectory: list[torch.Tensor] = []
        try:
            runs[name] = (generate(trajectory, runs[forced][2] if forced else None), watch, trajectory)
        finally:
            watch.close()
            detach()
    return runs


def test_equals_diffusers_with_batched_cfg_on_a_tiny_wan():
    pipe = tiny_wan_pipeline()
    model = pipe.transformer
    cond, uncond = pipe.encode_prompt("a red cat", negative_prompt="blurry", max_sequence_length=16)
    clock = [0.0]

    @torch.no_grad()
    def generate(trajectory, forced):
        x = torch.randn((1, 4, 2, 10, 10), generator=torch.Generator().manual_seed(0))
        pipe.scheduler.set_timesteps(STEPS)
        for index, t in enumerate(pipe.scheduler.timesteps):
            clock[0] = t
            both = model(
                hidden_states=torch.cat([x, x]),
                timestep=t.expand(2),
                encoder_hidden_states=torch.cat([uncond, cond]),
                return_dict=False,
            )[0]
            u, c = both.chunk(2)
            x = pipe.scheduler.step(u + 5.0 * (c - u), t, x, return_dict=False)[0]
            trajectory.append(x)
            x = x if forced is None else forced[index]
        return x

    def with_diffusers():
        apply_faster_cache(model, DiffusersFasterCache(current_timestep_callback=lambda: clock[0]))
        return lambda: _remove_diffusers(model)

    def with_cachekit():
        handle = cachekit.apply(pipe, FasterCacheConfig(branches={"cfg": "batched"}))
        return handle.remove

    runs = compare(generate, model, with_cachekit, with_diffusers)
    _check(runs, STEPS)


def test_equals_diffusers_with_batched_cfg_on_wan_moving_digits():
    pipe = testbed.load("wan-moving-digits")
    model = pipe.transformer
    clock = [0.0]

    def tick(_module, _args, kwargs):  # what diffusers' pipelines give as current_timestep
        clock[0] = kwargs["timestep"].max()

    ticking = model.register_forward_pre_hook(tick, with_kwargs=True)

    def generate(trajectory, forced):
        def step_end(_pipe, index, _t, values):
            trajectory.append(values["latents"])
            return values if forced is None else {"latents": forced[index]}

        return pipe(labels=[3, 8], seed=0, num_inference_steps=STEPS, batched_cfg=True, callback_on_step_end=step_end)

    def with_diffusers():
        apply_faster_cache(model, DiffusersFasterCache(current_timestep_callback=lambda: clock[0]))
        return lambda: _remove_diffusers(model)

    def with_cachekit():
        return cachekit.apply(pipe, FasterCacheConfig(branches={"cfg": "batched"})).remove

    runs = compare(generate, model, with_cachekit, with_diffusers)
    ticking.remove()
    _check(runs, STEPS)


def _check(runs, steps):
    """Same schedule (the batch each call ran on, whether its self-attention computed), the same
    prediction from every call given the same inputs, and the same free-running output, within 1e-5."""
    theirs, their_watch, _ = runs["diffusers"]
    ours, our_watch, _ = runs["cachekit"]
    _, forced_watch, _ = runs["forced"]
    schedule = their_watch.schedule()
    assert our_watch.schedule() == forced_watch.schedule() == schedule
    full = schedule[0][0]
    assert sum(batch < full for batch, _ in schedule) >= steps // 4  # the unconditional half was skipped often
    assert any(batch < full and not attention for batch, attention in schedule)  # and attention reused
    for (_, _, our_prediction), (_, _, their_prediction) in zip(forced_watch.calls, their_watch.calls, strict=True):
        torch.testing.assert_close(our_prediction, their_prediction, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def _remove_diffusers(model):
    registry = model._diffusers_hook
    registry.reset_stateful_hooks(recurse=True)
    registry.remove_hook("faster_cache_denoiser", recurse=False)
    registry.remove_hook("faster_cache_block", recurse=True)


def test_runs_with_cfg_as_two_calls_on_the_published_schedule():
    """Diffusers' FasterCache needs batched CFG; cachekit's runs Wan's two calls: the second call is
    produced on every step after the first but each 5th while t < 641, and on those steps the first
    call's self-attention is computed only on even steps while t < 681."""
    pipe = tiny_wan_pipeline()
    reference = run_wan(pipe, steps=STEPS)
    timesteps = pipe.scheduler.timesteps.tolist()
    with cachekit.apply(pipe, FasterCacheConfig()) as handle:
        output = run_wan(pipe, steps=STEPS)
    alone = [i > 0 and i % 5 != 0 and -1 < t < 641 for i, t in enumerate(timesteps)]
    attention_reused = [
        a and i % 2 != 0 and -1 < t < 681 for i, (a, t) in enumerate(zip(alone, timesteps, strict=True))
    ]
    stats = handle.stats.last.branches
    blocks = len(pipe.transformer.blocks)
    assert stats[1].produced == sum(alone) > 0
    assert stats[0].module_schedule == [blocks * (2 - reused) for reused in attention_reused]
    assert stats[0].sites["spatial"].reused == blocks * sum(attention_reused)
    assert output.shape == reference.shape and torch.isfinite(output).all()
    assert not torch.equal(output, reference)
