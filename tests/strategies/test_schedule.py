"""The schedule strategy and its search: masks run as given, the dynamic program against a brute
force, edge costs against plain generations, and a searched mask for a budget saved and used."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest
import torch
from helpers import ExecutionCounter, install_straight_line

import cachekit
from cachekit.budget import BudgetError, save
from cachekit.errors import StepCountError
from cachekit.schedule import EdgeCosts, best_path, evenly_spaced
from cachekit.schemas import CalibrationSpec, ScheduleConfig
from cachekit.schemas.checked import ConfigError
from cachekit.study.models import TestbedModel
from cachekit.tune import Tuner, tuned_setting

STEPS = 10
MASK = "1100101001"


def test_schedule_matches_straight_line_reference_and_runs_only_its_steps(family):
    pipe, run, counted = family
    blocks = counted(pipe.transformer)
    counter = ExecutionCounter(blocks)
    with cachekit.apply(pipe, ScheduleConfig(mask=MASK)) as handle:
        cached = run(pipe, steps=STEPS)
    counter.close()

    expected = [c == "1" for c in MASK]
    assert counter.count == sum(expected) * 2 * len(blocks)  # both CFG branches follow the mask
    for branch in (0, 1):
        assert handle.stats.last.branches[branch].span_schedule == expected
    install_straight_line(pipe.transformer, lambda step, branch, probe, embedding: expected[step])
    assert torch.equal(cached, run(pipe, steps=STEPS))


def test_a_mask_for_another_step_count_is_refused_unless_resampled(family):
    pipe, run, _ = family
    with (
        cachekit.apply(pipe, ScheduleConfig(mask=MASK)),
        pytest.raises(
            StepCountError, match=r"the schedule's mask has 10 steps but this generation has 5: search one at 5 steps"
        ),
    ):
        run(pipe, steps=5)
    with cachekit.apply(pipe, ScheduleConfig(mask="1101", resample=True)) as handle:
        run(pipe, steps=8)
    assert handle.stats.last.branches[0].span_schedule == [True, True, True, True, False, False, True, True]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, r"give the mask \(e\.g\. mask=\"1101\.\.\.\", one character per step\) or a budget"),
        ({"mask": "0111"}, r"mask\n  \"1\" \(compute\) or \"0\" \(reuse\) per step, the first \"1\" .*got '0111'"),
        ({"mask": "11a1"}, r"mask\n  \"1\" \(compute\) or \"0\" \(reuse\) per step.*got '11a1'"),
    ],
)
def test_bad_schedule_configs_are_named(fields, message):
    with pytest.raises(ConfigError, match=message):
        ScheduleConfig(**fields)


def _cost_of(mask: str, costs: dict) -> float | None:
    """The test's own sum of a mask's edge costs (None: it uses an edge that has no cost)."""
    computed = [index for index, c in enumerate(mask) if c == "1"] + [len(mask)]
    edges = list(itertools.pairwise(computed))
    return None if any(edge not in costs for edge in edges) else sum(costs[edge] for edge in edges)


@pytest.mark.parametrize("steps", [6, 7, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_dynamic_program_finds_the_brute_force_optimum(steps, seed):
    generator = random.Random(seed * 100 + steps)
    longest = generator.choice([2, 3, steps])
    costs = {(i, j): generator.random() for i in range(steps) for j in range(i + 1, steps + 1) if j - i <= longest}
    for computed in range(1, steps + 1):
        masks = ["1" + "".join(rest) for rest in itertools.product("01", repeat=steps - 1)]
        totals = {m: _cost_of(m, costs) for m in masks if m.count("1") == computed}
        feasible = {m: total for m, total in totals.items() if total is not None}
        found = best_path(costs, steps, computed)
        if not feasible:
            assert found is None
            continue
        assert found is not None
        mask, total = found
        assert mask.count("1") == computed and mask[0] == "1"
        assert total == pytest.approx(min(feasible.values()))
        assert _cost_of(mask, costs) == pytest.approx(total)


def test_evenly_spaced_masks_compute_exactly_so_many_steps():
    assert evenly_spaced(10, 5) == "1010101010"
    assert evenly_spaced(10, 3) == "1001001000"
    assert all(evenly_spaced(28, k).count("1") == k for k in range(1, 29))


@pytest.fixture(scope="module")
def digits():
    return TestbedModel("flux-digits", CalibrationSpec(model="flux-digits", labels=[5], steps=STEPS))


def test_edge_costs_equal_the_error_of_plain_generations(digits):
    """An edge (0, j) is the error of the latents reaching step j after computing step 0 and
    skipping the steps between: a plain generation with that mask reaches the same latents."""
    base = {"strategy": "schedule", "estimator": {"kind": "taylor", "order": 1}}
    pairs = [(1000, "5"), (1001, "3")]
    tuner = Tuner(digits, base, seeds=[1000, 1001], conditions=["5"])
    costs = EdgeCosts(digits, base, pairs, tuner.bar).up_to(4)

    def latents(mask: str | None, pair) -> list[torch.Tensor]:
        seen: list[torch.Tensor] = []
        if mask is None:
            digits.generate(*pair, on_step=lambda index, x: seen.append(x.clone()))
        else:
            with cachekit.apply(digits.target, {**base, "mask": mask}):
                digits.generate(*pair, on_step=lambda index, x: seen.append(x.clone()))
        return seen

    for gap in (2, 3, 4):
        mask = "1" + "0" * (gap - 1) + "1" * (STEPS - gap)
        errors = [
            (latents(mask, pair)[gap - 1] - latents(None, pair)[gap - 1]).square().mean().sqrt().item()
            for pair in pairs
        ]
        assert costs[(0, gap)] == pytest.approx(statistics.fmean(errors), rel=1e-5)
    assert {j - i for i, j in costs} == {1, 2, 3, 4}
    assert all(cost == 0.0 for (i, j), cost in costs.items() if j - i == 1)
    assert all(costs[(i, STEPS)] > 0 for i in range(STEPS - 4, STEPS - 1))  # edges to the end, skipping the last steps


@pytest.fixture(scope="module")
def searched(digits, tmp_path_factory):
    base = {"strategy": "schedule"}
    tuner = Tuner(digits, base, seeds=[1000], conditions=["5"])
    result = tuner.to_budget(0.4)
    path = save(tmp_path_factory.mktemp("schedule") / "masks.json", tuned_setting(digits, base, result, 0.4))
    return tuner, result, path


def test_the_search_spends_the_budget_and_keeps_its_best_candidate(searched):
    tuner, result, _ = searched
    assert {len(str(trial.value)) for trial in result.trials} == {STEPS}
    assert all(str(trial.value).count("1") == 4 for trial in result.trials)
    assert all(trial.computed == pytest.approx(0.4) for trial in result.trials)  # counted from the outside
    assert evenly_spaced(STEPS, 4) in [trial.value for trial in result.trials]
    assert result.chosen.quality == max(trial.quality for trial in result.trials)
    assert tuner.to_budget(0.4).chosen == result.chosen  # deterministic; the edges are measured once
    with pytest.raises(BudgetError, match=r"schedule cannot spend as little as 5\.0% .* at least 10\.0%"):
        tuner.to_budget(0.05)
    with pytest.raises(ValueError, match=r"mask is searched for a budget: give --budget, not --quality"):
        tuner.to_quality(30)


def test_a_searched_mask_is_taken_by_its_budget_and_refused_at_another_step_count(searched, digits):
    _, result, path = searched
    config = {"strategy": "schedule", "budget": 0.4, "tuned": str(path)}
    with cachekit.apply(digits.target, config) as handle:
        digits.generate(7, "3")
    assert handle.strategy.config.mask == result.chosen.value
    assert handle.stats.last.branches[0].span_schedule == [c == "1" for c in str(result.chosen.value)]
    assert handle.stats.info["budget"].startswith(f"40% tuned at {STEPS} steps: mask={result.chosen.value}")
    with cachekit.apply(digits.target, config), pytest.raises(StepCountError, match=r"tuned at 10"):
        digits.generate(7, "3", steps=6)
