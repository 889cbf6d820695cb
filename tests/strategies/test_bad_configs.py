"""Strategy configs that are wrong are refused by name, saying what is allowed."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pydantic
import pytest
import torch
from bad_input import NoneDecision, V, declare, register_strategy_class, run_bare

import cachekit
from cachekit.errors import (
    AlreadyAttachedError,
    HandleRemovedError,
    StepCountError,
    StrategyError,
    UnknownEstimatorError,
    UnknownStrategyError,
    UnsupportedModelError,
)
from cachekit.schemas import (
    Broadcast,
    EasyCacheConfig,
    FBCacheConfig,
    MagCacheConfig,
    MLPBroadcast,
    MLPBroadcastAt,
    PABConfig,
    SeaCacheConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
    UniformConfig,
)
from cachekit.testing import tiny_flux_transformer, tiny_wan_transformer


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"strategy": "fbcache", "first_blocks": 0}, r"first_blocks\n.*greater than or equal to 1"),
        ({"strategy": "fbcache", "threshold": -0.1}, r"threshold\n.*greater than or equal to 0"),
        ({"strategy": "taylorseer", "warmup_steps": 0}, r"warmup_steps\n.*greater than or equal to 1"),
        (
            {"strategy": "taylorseer", "cooldown_from": 2},
            r"cooldown_from \(2\) must come after the warm-up \(3 steps\)",
        ),
        ({"strategy": "taylorseer", "level": "blocks"}, r"level\n.*'span', 'attention' or 'modules'"),
        ({"strategy": "magcache", "preset": "flux-dev", "retention_ratio": 1.0}, r"retention_ratio\n.*less than 1"),
        ({"strategy": "seacache", "power_exp": 0}, r"power_exp\n.*greater than 0"),
        ({"strategy": "easycache", "warmup_steps": 1}, r"warmup_steps\n.*greater than or equal to 2"),
        ({"strategy": "easycache", "threshold": math.inf}, r"threshold\n.*finite number"),
    ],
)
def test_bad_method_configs_are_named(config, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        cachekit.make_config(config)


CASES = [
    ("uniform interval 0", lambda t: UniformConfig(interval=0), V, r"interval\n.*greater than or equal to 1"),
    ("uniform warmup 0", lambda t: UniformConfig(warmup=0), V, r"warmup\n.*greater than or equal to 1"),
    (
        "unknown field",
        lambda t: UniformConfig(intervall=2),
        V,
        r"intervall\n  unknown field \(did you mean 'interval'\?\); UniformConfig takes: strategy, .*interval, warmup$",
    ),
    (
        "estimator of another type",
        lambda t: UniformConfig(estimator=2),
        V,
        r"estimator\n  an estimator is a kind name, a dict with a 'kind' or an estimator config, got 2; built-in "
        r"kinds: copy, taylor, foca",
    ),
    (
        "a config field named as in the paper",
        lambda t: cachekit.make_config({"strategy": "teacache", "threshold": 0.2}),
        V,
        r"threshold\n  unknown field \(did you mean 'rel_l1_thresh'\?\); TeaCacheConfig takes: ",
    ),
    (
        "config error text without pydantic's link",
        lambda t: TeaCacheConfig(rel_l1_thresh="high", warmup_steps=-1),
        V,
        r"^2 invalid fields for TeaCacheConfig\nrel_l1_thresh\n  Input should be a valid number, unable to parse "
        r"string as a number \(got 'high'\)\nwarmup_steps\n  .*greater than or equal to 1 \(got -1\)$",
    ),
    (
        "apply given a file cachekit does not read",
        lambda t: cachekit.apply(tiny_flux_transformer(), "policy.yaml"),
        UnknownStrategyError,
        r"'policy\.yaml' is neither a strategy name nor a config file cachekit reads: give a \.json or \.toml "
        r"file, or a strategy name \(.*uniform\)",
    ),
    (
        "relative preset path not found",
        lambda t: TeaCacheConfig(preset="presets/mine.json"),
        V,
        r"preset\n  TeaCache preset file /\S+/presets/mine\.json does not exist",
    ),
    (
        "config without strategy",
        lambda t: cachekit.make_config({"interval": 2}),
        ValueError,
        r"needs a 'strategy' key; known strategies: .*uniform",
    ),
    (
        "unknown strategy",
        lambda t: cachekit.make_config("teacash"),
        UnknownStrategyError,
        r"unknown strategy 'teacash'; known strategies: .*teacache",
    ),
    (
        "config of another type",
        lambda t: cachekit.make_config(42),
        TypeError,
        r"must be a StrategyConfig, a dict with a 'strategy' key, a \.json/\.toml path",
    ),
    (
        "config file suffix",
        lambda t: cachekit.make_config(Path(t / "p.yaml")),
        ValueError,
        r"p\.yaml: a strategy config file must end in \.json or \.toml",
    ),
    ("config file missing", lambda t: cachekit.make_config(Path(t / "p.json")), ValueError, r"p\.json: cannot read it"),
    (
        "config file not json",
        lambda t: (t / "p.json").write_text("{strategy: uniform") and cachekit.make_config(t / "p.json"),
        ValueError,
        r"p\.json: not a valid JSON table",
    ),
    (
        "config file not toml",
        lambda t: (t / "p.toml").write_text("strategy = uniform") and cachekit.make_config(t / "p.toml"),
        ValueError,
        r"p\.toml: not a valid TOML table",
    ),
    (
        "num_inference_steps 0",
        lambda t: UniformConfig(num_inference_steps=0),
        V,
        r"num_inference_steps\n.*greater than or equal to 1",
    ),
    ("teacache negative threshold", lambda t: TeaCacheConfig(rel_l1_thresh=-1), V, r"rel_l1_thresh\n.*greater than 0"),
    (
        "teacache one coefficient",
        lambda t: TeaCacheConfig(coefficients=[1.0], rel_l1_thresh=0.1),
        V,
        r"coefficients\n.*at least 2 items",
    ),
    (
        "teacache unknown preset",
        lambda t: TeaCacheConfig(preset="flux-deb"),
        V,
        r"unknown TeaCache preset 'flux-deb': neither one of .*flux-dev.* nor a preset file",
    ),
    (
        "teacache preset and coefficients",
        lambda t: TeaCacheConfig(preset="flux-dev", coefficients=[1, 0]),
        V,
        r"either coefficients or preset, not both",
    ),
    (
        "teacache two warm-ups",
        lambda t: TeaCacheConfig(warmup_steps=2, warmup_share=0.1),
        V,
        r"warmup_steps or warmup_share, not both",
    ),
    (
        "teacache unknown probe",
        lambda t: TeaCacheConfig(probe="output"),
        V,
        r"probe\n.*'modulated_input', 'timestep_embedding' or 'projected_timestep_embedding'",
    ),
    (
        "pab window past 1000",
        lambda t: Broadcast(range=2, window=(900, 1100)),
        V,
        r"0 <= low < high <= 1000 \(the training timestep scale\), got \(900\.0, 1100\.0\)",
    ),
    ("pab window reversed", lambda t: Broadcast(range=2, window=(500, 100)), V, r"0 <= low < high <= 1000"),
    ("pab range 0", lambda t: Broadcast(range=0), V, r"range\n.*greater than or equal to 1"),
    ("pab mlp without blocks", lambda t: MLPBroadcast(range=2, blocks=()), V, r"blocks\n.*at least 1 item"),
    ("pab mlp negative block", lambda t: MLPBroadcast(range=2, blocks=(-1,)), V, r"block indices >= 0, got \(-1,\)"),
    (
        "pab mlp timestep past 1000",
        lambda t: MLPBroadcastAt(timesteps=(720, 1200), blocks=(0,)),
        V,
        r"timesteps must lie on the 0-1000 training scale, got \(720\.0, 1200\.0\)",
    ),
    (
        "pab mlp skip 0",
        lambda t: MLPBroadcastAt(timesteps=(720,), skip=0, blocks=(0,)),
        V,
        r"skip\n.*greater than or equal to 1",
    ),
    (
        "pab mlp neither rule",
        lambda t: PABConfig(mlp=True),
        V,
        r"mlp\n.*expected an MLPBroadcast \(range, blocks, window\), an MLPBroadcastAt \(timesteps, blocks, skip\), "
        r"False \(off\) or nothing",
    ),
    (
        "pab mlp block out of range",
        lambda t: cachekit.apply(tiny_flux_transformer(), PABConfig(mlp=MLPBroadcast(range=2, blocks=(7,)))),
        ValueError,
        r"mlp\.blocks \[7\] out of range: the model has 3 blocks",
    ),
    (
        "estimator unknown",
        lambda t: cachekit.make_config({"strategy": "uniform", "estimator": "taylr"}),
        UnknownEstimatorError,
        r"unknown estimator kind 'taylr'; known kinds: copy, .*taylor",
    ),
    (
        "estimator order 0",
        lambda t: UniformConfig(estimator={"kind": "taylor", "order": 0}),
        V,
        r"estimator\.order\n.*greater than or equal to 1",
    ),
    (
        "estimator without kind",
        lambda t: UniformConfig(estimator={"order": 2}),
        V,
        r"an estimator needs a 'kind'; built-in kinds: copy, taylor, foca",
    ),
    (
        "estimator unknown field",
        lambda t: UniformConfig(estimator={"kind": "foca", "order": 2}),
        V,
        r"estimator\.order\n  unknown field; FoCaConfig takes: kind, dtype$",
    ),
    (
        "fbcache first blocks 0",
        lambda t: FBCacheConfig(first_blocks=0),
        V,
        r"first_blocks\n.*greater than or equal to 1",
    ),
    (
        "fbcache first + last too many",
        lambda t: cachekit.apply(tiny_flux_transformer(), FBCacheConfig(first_blocks=2, last_blocks=1)),
        ValueError,
        r"keeps 2 blocks at the head and 1 at the tail .* has 3 blocks.*first \+ last < 3",
    ),
    (
        "magcache ratios for another step count",
        lambda t: cachekit.apply(
            tiny_flux_transformer(), MagCacheConfig(mag_ratios=(1.0, 1.0, 1.0), num_inference_steps=5)
        ),
        ValueError,
        r"3 magnitude ratios but the generation has 5 steps: give one ratio per step .* interpolate=True",
    ),
    ("magcache ratio 0", lambda t: MagCacheConfig(mag_ratios=(1.0, 0.0)), V, r"mag_ratios\.1\n.*greater than 0"),
    (
        "magcache no set for the model",
        lambda t: cachekit.apply(tiny_flux_transformer(), MagCacheConfig(num_inference_steps=4)),
        ValueError,
        r"no MagCache ratio set is known for this FluxTransformer2DModel .*shipped sets: flux-dev.*calibrate",
    ),
    (
        "taylorseer cool-down inside warm-up",
        lambda t: TaylorSeerConfig(warmup_steps=4, cooldown_from=3),
        V,
        r"cooldown_from \(3\) must come after the warm-up \(4 steps\)",
    ),
    ("seacache power 0", lambda t: SeaCacheConfig(power_exp=0), V, r"power_exp\n.*greater than 0"),
    (
        "easycache warm-up 1",
        lambda t: EasyCacheConfig(warmup_steps=1),
        V,
        r"warmup_steps\n.*greater than or equal to 2",
    ),
    (
        "apply to a string",
        lambda t: cachekit.apply("black-forest-labs/FLUX.1-dev", "uniform"),
        TypeError,
        r"takes a diffusers pipeline with a `transformer` or a transformer module, got str",
    ),
    (
        "unsupported model",
        lambda t: cachekit.apply(torch.nn.Linear(2, 2), "uniform"),
        UnsupportedModelError,
        r"no cachekit adapter supports Linear; supported models: .*FluxTransformer2DModel",
    ),
    (
        "bare transformer without length",
        lambda t: cachekit.apply(tiny_flux_transformer(), UniformConfig()),
        ValueError,
        r"'uniform' must know the generation's length: apply it to the pipeline, or set num_inference_steps",
    ),
    (
        "compiled wrapper to resolve",
        lambda t: cachekit.resolve_adapter(torch.compile(tiny_flux_transformer())),
        UnsupportedModelError,
        r"torch\.compile wrapper: pass the model it wraps .* or compile the blocks instead",
    ),
    (
        "teacache preset of another family",
        lambda t: cachekit.apply(tiny_flux_transformer(), TeaCacheConfig(preset="mochi", num_inference_steps=4)),
        ValueError,
        r"preset 'mochi' was made on a 'mochi' model, not this FluxTransformer2DModel .*allow_other_model=True",
    ),
    (
        "teacache no preset fits",
        lambda t: cachekit.apply(tiny_wan_transformer(), TeaCacheConfig(num_inference_steps=4)),
        ValueError,
        r"no TeaCache preset fits WanTransformer3DModel .*known presets: .*calibrate",
    ),
    (
        "step count shorter than the loop",
        lambda t: run_bare(tiny_flux_transformer(), UniformConfig(num_inference_steps=2), [1.0, 0.5, 0.2]),
        StepCountError,
        r"step 3 \(timestep 200\) of a generation of 2 steps: .*num_inference_steps",
    ),
    (
        "timestep argument is the text",
        lambda t: run_bare(
            declare(timestep={"argument": {"name": "encoder_hidden_states", "position": 1}}).model,
            UniformConfig(num_inference_steps=4),
            [1.0],
        ),
        ValueError,
        r"the timestep argument of this VariantFlux call is a tensor of shape \(1, 4, 32\), not a timestep",
    ),
]


@pytest.mark.parametrize(("make", "error", "message"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_named(tmp_path, fresh_registry, make, error, message):
    with pytest.raises(error, match=rf"(?s){message}"):
        make(tmp_path)


def test_the_table_keeps_its_cases():
    assert len(CASES) >= 46  # the table the bad-input tests were split from held 77 cases in all


def test_a_decision_that_is_not_a_bool_is_named(fresh_registry):
    register_strategy_class(NoneDecision, lambda step: None if step.index else True)
    with pytest.raises(
        StrategyError, match=r"decide_span returned None \(NoneType\); a decision must be True \(compute\) or False"
    ):
        run_bare(tiny_flux_transformer(), {"strategy": "forgets_return"}, [1.0, 0.5])


def test_handles_refuse_a_second_strategy_and_use_after_removal():
    model = tiny_flux_transformer()
    handle = cachekit.apply(model, UniformConfig(num_inference_steps=4))
    with pytest.raises(AlreadyAttachedError, match=r"already has a cache strategy attached .*remove that handle first"):
        cachekit.apply(model, "uniform")
    handle.remove()
    with pytest.raises(HandleRemovedError, match=r"this CacheHandle was removed; call cachekit\.apply"):
        handle.reset()


def test_diffusers_cache_already_on_is_refused():
    from diffusers.hooks import FirstBlockCacheConfig

    model = tiny_flux_transformer()
    model.enable_cache(FirstBlockCacheConfig())
    with pytest.raises(
        AlreadyAttachedError, match=r"has diffusers' FirstBlockCacheConfig enabled .*disable_cache\(\) first"
    ):
        cachekit.apply(model, UniformConfig(num_inference_steps=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.disable_cache()
    cachekit.apply(model, UniformConfig(num_inference_steps=4)).remove()
