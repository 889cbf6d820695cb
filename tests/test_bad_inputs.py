"""Wrong or unusual input, as a careless user would give it: each gets an error of a named type whose
message says what is wrong and what is allowed, as early as it can be known."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Literal

import pydantic
import pytest
import torch
from diffusers import FluxTransformer2DModel
from helpers import flux_inputs

import cachekit
from cachekit.errors import (
    AlreadyAttachedError,
    HandleRemovedError,
    MissingPointError,
    StepCountError,
    StrategyError,
    UnknownEstimatorError,
    UnknownStrategyError,
    UnsupportedModelError,
)
from cachekit.hookspecs import hookimpl
from cachekit.metric import MetricError
from cachekit.registry import PluginWarning
from cachekit.schemas import (
    AdapterSpec,
    Broadcast,
    CalibrationSpec,
    EasyCacheConfig,
    FBCacheConfig,
    MagCacheConfig,
    MLPBroadcast,
    MLPBroadcastAt,
    PABConfig,
    SeaCacheConfig,
    StrategyConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
    UniformConfig,
)
from cachekit.schemas.adapter import LatentSpec
from cachekit.study import StudySpecError, load_spec, plan, run_study, write_report
from cachekit.study.metrics import metrics_for
from cachekit.study.store import ResultStore, StoreError
from cachekit.testing import tiny_flux_transformer, tiny_wan_transformer
from cachekit.tune import check_target

V = pydantic.ValidationError
FLUX_BLOCKS = {"path": "transformer_blocks", "streams": [{"name": "hidden_states", "position": 0}]}


class VariantFlux(FluxTransformer2DModel):
    """A subclass, so the spec's adapter (registered for it) wins over the built-in Flux one."""


def declare(**changes: Any) -> Any:
    """Register the adapter of a spec for a tiny Flux (one list: its double blocks) and make it."""
    spec = {
        "name": "flux_variant",
        "timestep": {"argument": {"name": "timestep", "position": 3}, "scale": 1000},
        "timestep_embedding": {"module": "time_text_embed"},
        "blocks": [
            {
                "path": "transformer_blocks",
                "streams": [{"name": "hidden_states", "position": 0}, {"name": "encoder_hidden_states", "position": 1}],
                "returns": [1, 0],
                "attention": {"attn": "spatial"},
            }
        ],
        "probe": {"kind": "norm", "arguments": {"emb": {"name": "temb", "position": 2}}},
        **changes,
    }
    adapter = cachekit.declare_adapter(spec, VariantFlux)

    class Plugin:
        @hookimpl
        def cachekit_register_adapters(self, register):
            register(adapter)

    cachekit.register_plugin(Plugin(), f"variant-{id(adapter)}")
    model = tiny_flux_transformer()
    model.__class__ = VariantFlux
    return adapter(model)


def run_bare(model: torch.nn.Module, config: Any, timesteps: list[float]) -> None:
    with cachekit.apply(model, config):
        for timestep in timesteps:
            model(**flux_inputs(timestep=timestep))


def study_spec(tmp: Path, text: str) -> Path:
    path = tmp / "spec.toml"
    path.write_text(text)
    return path


BASE_STUDY = 'models = ["flux-digits"]\nlabels = [1]\nsteps = 4\nrepeats = 1\nwarmup = 0\n'


def run_spec(tmp: Path, text: str) -> None:
    run_study(load_spec(study_spec(tmp, BASE_STUDY + text)), tmp / "results.sqlite", progress=False)


class _NoneDecision(StrategyConfig):
    strategy: Literal["forgets_return"] = "forgets_return"


def register_strategy_class(config_class: type[StrategyConfig], decide: Any) -> None:
    class Strategy(cachekit.Strategy):  # type: ignore[type-arg]
        requires = frozenset({cachekit.Place.SPAN})

        def decide_span(self, step, signals, state):
            return decide(step)

    Strategy.config_class = config_class

    class Plugin:
        @hookimpl
        def cachekit_register_strategies(self, register):
            register(Strategy)

    cachekit.register_plugin(Plugin(), f"test-{config_class.registered_name()}")


def plugin_warning(registers: Any, name: str) -> None:
    class Plugin:
        @hookimpl
        def cachekit_register_strategies(self, register):
            registers(register)

    cachekit.register_plugin(Plugin(), name)


def _no_fixed_name(register: Any) -> None:
    class Loose(StrategyConfig):
        strategy: str = Field(default=None)  # type: ignore[assignment]

    class Strategy(cachekit.Strategy):  # type: ignore[type-arg]
        config_class = Loose

    register(Strategy)


from pydantic import Field  # noqa: E402  (used by the plugin defined above)

#: (id, what to do (given tmp_path), error type, what the message must say)
CASES: list[tuple[str, Any, type[BaseException] | tuple[type[BaseException], ...], str]] = [
    # -- strategy configs -------------------------------------------------------------------------
    ("uniform interval 0", lambda t: UniformConfig(interval=0), V, r"interval\n.*greater than or equal to 1"),
    ("uniform warmup 0", lambda t: UniformConfig(warmup=0), V, r"warmup\n.*greater than or equal to 1"),
    ("unknown field", lambda t: UniformConfig(intervall=2), V, r"intervall\n.*Extra inputs are not permitted"),
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
        r"estimator\.order\n.*Extra inputs are not permitted",
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
    # -- models ---------------------------------------------------------------------------------
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
    # -- adapter specs ----------------------------------------------------------------------------
    (
        "spec name",
        lambda t: AdapterSpec(name="My DiT", blocks=[FLUX_BLOCKS]),
        V,
        r"name\n.*String should match pattern '\^\[a-z\]\[a-z0-9_\]\*\$'",
    ),
    (
        "spec streams without returns",
        lambda t: AdapterSpec(name="x", blocks=[{**FLUX_BLOCKS, "streams": [FLUX_BLOCKS["streams"][0]] * 2}]),
        V,
        r"a block carrying 2 streams must say where it returns each",
    ),
    (
        "spec returns count",
        lambda t: AdapterSpec(name="x", blocks=[{**FLUX_BLOCKS, "returns": [0, 1]}]),
        V,
        r"'returns' has 2 entries for 1 streams",
    ),
    (
        "spec probe given and missing",
        lambda t: AdapterSpec(name="x", blocks=[FLUX_BLOCKS], probe={"kind": "norm"}, missing={"probe": "none"}),
        V,
        r"'probe' is both given and listed as missing",
    ),
    (
        "spec kind present and missing",
        lambda t: AdapterSpec(
            name="x", blocks=[{**FLUX_BLOCKS, "attention": {"attn": "spatial"}}], missing_attention={"spatial": "no"}
        ),
        V,
        r"attention kind 'spatial' is both declared on a block list and listed as missing",
    ),
    (
        "spec unknown point",
        lambda t: AdapterSpec(name="x", blocks=[FLUX_BLOCKS], missing={"probes": "x"}),
        V,
        r"missing\.probes\.\[key\]\n.*'span', 'attention', 'mlp', 'probe'",
    ),
    (
        "spec latent ids without packed layout",
        lambda t: LatentSpec(ids={"name": "img_ids"}),
        V,
        r"ids and grid lay out packed tokens; give layout 'BNC' or 'BTNC'",
    ),
    (
        "spec block list that is not there",
        lambda t: declare(blocks=[{**FLUX_BLOCKS, "path": "blockz"}]),
        ValueError,
        r"VariantFlux has no block list 'blockz'; its children are .*transformer_blocks",
    ),
    (
        "spec attention path no block has",
        lambda t: declare(blocks=[{**FLUX_BLOCKS, "attention": {"atn": "spatial"}}]),
        ValueError,
        r"no block of 'transformer_blocks' has a module 'atn'",
    ),
    (
        "spec timestep argument not a parameter",
        lambda t: declare(timestep={"argument": {"name": "t", "position": 3}}),
        ValueError,
        r"timestep argument 't' is not a parameter of VariantFlux\.forward; its parameters: hidden_states",
    ),
    (
        "spec argument at the wrong position",
        lambda t: declare(timestep={"argument": {"name": "timestep", "position": 1}}),
        ValueError,
        r"timestep argument 'timestep' is parameter 3 of VariantFlux\.forward, not 1",
    ),
    (
        "spec embedding module not there",
        lambda t: declare(timestep_embedding={"module": "time_embed"}),
        ValueError,
        r"has no signal module 'time_embed'; its children are .*time_text_embed",
    ),
    (
        "spec probe norm not there",
        lambda t: declare(probe={"kind": "norm", "module": "norm0"}),
        ValueError,
        r"has no probe norm of the first block 'norm0'",
    ),
    (
        "spec probe table not a tensor",
        lambda t: declare(probe={"kind": "table", "table": "modulation", "embedding": {"name": "temb", "position": 2}}),
        ValueError,
        r"the probe's table 'modulation' is not a tensor of the first block",
    ),
    (
        "spec file that does not parse",
        lambda t: (t / "s.toml").write_text("name = ") and cachekit.declare_adapter(t / "s.toml", torch.nn.Module),
        ValueError,
        r"s\.toml: not a valid TOML table",
    ),
    (
        "probe the adapter lacks",
        lambda t: cachekit.apply(
            declare(probe=None, missing={"probe": "not modulated"}).model,
            TeaCacheConfig(coefficients=[1, 0], rel_l1_thresh=0.1, num_inference_steps=4),
        ),
        (MissingPointError, AlreadyAttachedError),
        r"needs the 'probe' point, which the 'flux_variant' adapter does not provide .*not modulated|already",
    ),
    # -- studies --------------------------------------------------------------------------------
    (
        "study testbed name typo",
        lambda t: plan(
            load_spec(
                study_spec(
                    t, BASE_STUDY.replace("flux-digits", "flux-digitz") + '[[strategies]]\nstrategy = "uniform"\n'
                )
            )
        ),
        StudySpecError,
        r"models\[0\]: unknown model 'flux-digitz'; did you mean the testbed model 'flux-digits'\?",
    ),
    (
        "study unknown diffusers method",
        lambda t: plan(load_spec(study_spec(t, BASE_STUDY + '[[strategies]]\nstrategy = "diffusers.fora"\n'))),
        StudySpecError,
        r"unknown diffusers method 'diffusers\.fora'; known: diffusers\.first_block_cache",
    ),
    (
        "study name taken twice",
        lambda t: plan(
            load_spec(
                study_spec(
                    t,
                    BASE_STUDY
                    + '[[strategies]]\nstrategy = "uniform"\nname = "a"\n'
                    + '[[strategies]]\nstrategy = "teacache"\nname = "a"\n',
                )
            )
        ),
        StudySpecError,
        r"strategies\[1\]: the name 'a' is already taken",
    ),
    (
        "study setting twice",
        lambda t: plan(
            load_spec(
                study_spec(
                    t, BASE_STUDY + '[[strategies]]\nstrategy = "uniform"\n[[strategies]]\nstrategy = "uniform"\n'
                )
            )
        ),
        StudySpecError,
        r"strategies\[1\]: the setting uniform #2 appears twice",
    ),
    (
        "study spec not toml",
        lambda t: load_spec(study_spec(t, "models = [")),
        StudySpecError,
        r"invalid study spec .*spec\.toml",
    ),
    (
        "study spec unknown name",
        lambda t: load_spec("defualt"),
        StudySpecError,
        r"'defualt' is neither a \.toml/\.json study spec nor a shipped spec \(default\)",
    ),
    (
        "study setting that cannot run on the model",
        lambda t: run_spec(t, '[[strategies]]\nstrategy = "teacache"\n'),
        StudySpecError,
        r"teacache cannot run on flux-digits: no TeaCache preset fits",
    ),
    (
        "study report of no database",
        lambda t: write_report(t / "nothing.sqlite"),
        StoreError,
        r"no results database at .*nothing\.sqlite: run `cachekit study run`",
    ),
    (
        "study database not writable",
        lambda t: ResultStore("/proc/cachekit.sqlite"),
        StoreError,
        r"cannot use /proc/cachekit\.sqlite as a results database",
    ),
    # -- calibration and tuning -----------------------------------------------------------------
    (
        "calibration order above the samples",
        lambda t: CalibrationSpec(model="flux-digits", labels=[1], steps=3, order=4),
        V,
        r"order 4 needs more than 4 samples; seeds x conditions x \(steps - 1\) gives 2",
    ),
    (
        "calibration held-out seeds",
        lambda t: CalibrationSpec(model="flux-digits", labels=[1], seeds=[0], held_out_seeds=[0]),
        V,
        r"held_out_seeds \[0\] are also calibration seeds",
    ),
    (
        "calibration without conditions",
        lambda t: CalibrationSpec(model="flux-digits"),
        V,
        r"give labels \(testbed models\) or prompts",
    ),
    (
        "tune ratio 0",
        lambda t: check_target({"strategy": "teacache"}, ratio=0),
        ValueError,
        r"computed share must be in \(0, 1\], got 0",
    ),
    (
        "a primary metric that is not installed",
        lambda t: metrics_for([], "psnx"),
        MetricError,
        r"unknown metric 'psnx'; installed metrics: .*psnr",
    ),
    (
        "tune a strategy without knob",
        lambda t: check_target({"strategy": "pab"}),
        ValueError,
        r"strategy 'pab' declares no knob to tune; strategies with one: easycache, fbcache, magcache, seacache, "
        "taylorseer, teacache, uniform",
    ),
]


@pytest.mark.parametrize(("make", "error", "message"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_named(tmp_path, fresh_registry, make, error, message):
    with pytest.raises(error, match=rf"(?s){message}"):
        make(tmp_path)


def test_the_table_is_long_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize(
    ("register", "name", "message"),
    [
        (
            lambda r: r(dict),
            "not-a-strategy",
            r"'not-a-strategy' failed to load: .*registered <class 'dict'>, which is not a Strategy",
        ),
        (
            lambda r: r(cachekit.get_strategy("uniform")),
            "claims-uniform",
            r"plugin 'claims-uniform' registers strategy 'uniform', which plugin 'uniform' already registered",
        ),
        (_no_fixed_name, "loose-name", r"Loose must fix its strategy name: strategy: Literal\['my_name'\] = 'my_name'"),
    ],
)
def test_bad_plugins_are_reported_by_name_and_the_others_load(fresh_registry, register, name, message):
    with pytest.warns(PluginWarning, match=message):
        plugin_warning(register, name)
    assert name in cachekit.plugin_errors() and "uniform" in cachekit.list_strategies()


def test_a_decision_that_is_not_a_bool_is_named(fresh_registry):
    register_strategy_class(_NoneDecision, lambda step: None if step.index else True)
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


def test_cli_reports_mistakes_in_one_line(tmp_path):
    import subprocess
    import sys

    spec = tmp_path / "calibration.toml"
    spec.write_text('model = "flux-digits"\nlabels = [1]\nsteps = 4\norder = 2\n')
    cases = [
        (["tune", str(spec), "--strategy", "not json", "--ratio", "0.4"], r"--strategy: not valid JSON"),
        (
            ["tune", str(spec), "--strategy", '{"strategy": "teacache"}', "--ratio", "0"],
            r"cachekit: error: the computed share must be in \(0, 1\], got 0\.0",
        ),
        (["study", "report", str(tmp_path / "none.sqlite")], r"cachekit: error: no results database at"),
        (["study", "run", str(tmp_path / "nope.toml")], r"cachekit: error: .*nope\.toml: cannot read it"),
    ]
    for arguments, message in cases:
        result = subprocess.run(
            [sys.executable, "-m", "cachekit", *arguments], cwd=tmp_path, capture_output=True, text=True
        )
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert __import__("re").search(message, result.stderr), result.stderr
    assert not (tmp_path / "none.sqlite").exists()  # a report never creates the database it reads
    version = subprocess.run(
        [sys.executable, "-m", "cachekit", "--version"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith("cachekit ")
    json.dumps(version.stdout)
