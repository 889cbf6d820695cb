"""Two-expert pipelines (Wan 2.2): each transformer gets its own strategy state, on one step count."""

from __future__ import annotations

import torch
from helpers import module_state

import cachekit
from cachekit.schemas import PABConfig, UniformConfig
from cachekit.testing import run_wan, tiny_wan_pipeline

STEPS = 8


def expert_calls(pipe):
    """Timesteps of each expert's calls, seen from outside with plain torch hooks."""
    seen = {"transformer": [], "transformer_2": []}
    handles = [
        getattr(pipe, name).register_forward_pre_hook(
            lambda _, args, kwargs, name=name: seen[name].append(float(kwargs["timestep"].max())), with_kwargs=True
        )
        for name in seen
    ]
    return seen, handles


def test_never_reusing_is_exact_on_both_experts_and_remove_restores_both():
    pipe = tiny_wan_pipeline(two_experts=True)
    reference = run_wan(pipe, steps=STEPS)
    before = {name: module_state(getattr(pipe, name)) for name in ("transformer", "transformer_2")}
    with cachekit.apply(pipe, UniformConfig(interval=1)) as handle:
        cached = run_wan(pipe, steps=STEPS)
    assert torch.equal(cached, reference)
    assert torch.equal(run_wan(pipe, steps=STEPS), reference)
    assert {name: module_state(getattr(pipe, name)) for name in before} == before
    assert sorted(handle.stats_by_component) == ["transformer", "transformer_2"]


def test_each_expert_keeps_its_own_state_on_the_shared_step_count():
    pipe = tiny_wan_pipeline(two_experts=True)
    seen, hooks = expert_calls(pipe)
    with cachekit.apply(pipe, UniformConfig(interval=3)) as handle:
        run_wan(pipe, steps=STEPS)
    for hook in hooks:
        hook.remove()
    high, low = (handle.stats_by_component[name].last for name in ("transformer", "transformer_2"))
    timesteps = pipe.scheduler.timesteps.tolist()
    boundary = sum(t >= 800 for t in timesteps)
    assert 0 < boundary < STEPS
    assert len(seen["transformer"]) == 2 * boundary and len(seen["transformer_2"]) == 2 * (STEPS - boundary)
    # Step indices count through the whole generation: interval 3 computes steps 0, 3, 6 and the
    # last, whichever expert runs them; the low-noise expert computes its first step too, since it
    # has no residual of its own yet (it never borrows the other expert's).
    for stats, steps in [(high, range(boundary)), (low, range(boundary, STEPS))]:
        assert sorted(stats.branches) == [0, 1]
        for branch in stats.branches.values():
            expected = [i % 3 == 0 or i == STEPS - 1 or i == steps[0] for i in steps]
            assert branch.span_schedule == expected
            assert branch.calls == len(steps)


def test_module_strategies_keep_outputs_per_expert():
    """Watched from the outside on each expert's first attention: every output a reused call gets is
    the one that expert computed last for that branch, and the second expert's first call computes
    (it has nothing of its own; it never borrows the first expert's)."""
    pipe = tiny_wan_pipeline(two_experts=True)
    config = PABConfig(spatial={"range": 2, "window": (0.0, 1000.0)}, cross={"range": 2, "window": (0.0, 1000.0)})
    calls = {name: [] for name in ("transformer", "transformer_2")}  # (computed, output), in call order
    hooks = []
    for name, log in calls.items():
        attention = getattr(pipe, name).blocks[0].attn1
        ran = [False]
        hooks.append(attention.to_q.register_forward_hook(lambda *_, ran=ran: ran.__setitem__(0, True)))
        hooks.append(attention.register_forward_pre_hook(lambda *_, ran=ran: ran.__setitem__(0, False)))
        hooks.append(attention.register_forward_hook(lambda _, __, out, log=log, ran=ran: log.append((ran[0], out))))
    with cachekit.apply(pipe, config) as handle:
        run_wan(pipe, steps=STEPS)
    for hook in hooks:
        hook.remove()
    for name, log in calls.items():
        assert log[0][0], name  # each expert's first call computes
        last: dict[int, torch.Tensor] = {}
        for index, (computed, output) in enumerate(log):
            branch = index % 2  # cond, uncond
            if computed:
                last[branch] = output
            else:
                assert torch.equal(output, last[branch]), (name, index)
        assert sum(not computed for computed, _ in log) > 0, name  # it did reuse
    assert sorted(handle.stats_by_component) == ["transformer", "transformer_2"]


def test_the_summary_tells_each_expert_apart():
    pipe = tiny_wan_pipeline(two_experts=True)
    with cachekit.apply(pipe, UniformConfig(interval=2)) as handle:
        run_wan(pipe, steps=STEPS)
    summary = handle.summary()
    lines = summary.splitlines()
    assert lines[0] == "[transformer] uniform on wan" and "[transformer_2] uniform on wan" in lines
    for name, stats in handle.stats_by_component.items():
        assert [branch.context for branch in stats.last.branches.values()] == ["cond", "uncond"]  # the pipeline's
        for index, branch in stats.last.branches.items():
            schedule = "".join("C" if computed else "." for computed in branch.span_schedule)
            span = branch.sites["span"]
            counts = f"span {span.computed} computed / {span.reused} reused"
            context = f" ({branch.context})" if branch.context else ""
            assert f"branch {index}{context}: {branch.calls} calls, {counts}, schedule {schedule}" in summary, name
