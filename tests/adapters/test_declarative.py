"""Adapters written as data: a spec file for a DiT defined outside diffusers passes the same
conformance checks as the built-in adapters, and mistakes in a spec are named."""

from __future__ import annotations

import pytest
import torch
from custom_dit import TinyVideoDiT
from helpers import TESTS
from pydantic import ValidationError

import cachekit
from cachekit import conformance
from cachekit.declarative import Example, declare_adapter
from cachekit.errors import MissingPointError
from cachekit.hookspecs import hookimpl
from cachekit.schemas import TeaCacheConfig
from cachekit.schemas.adapter import AdapterSpec
from cachekit.schemas.files import read_table

SPEC_FILE = TESTS / "data" / "tiny_video_dit.toml"


EXAMPLE = Example(config=TinyVideoDiT, latents=(1, 3, 6, 4), conditions={"encoder_hidden_states": (1, 5, 8)})
TinyVideoDiTAdapter = declare_adapter(SPEC_FILE, TinyVideoDiT, EXAMPLE)


@pytest.fixture
def declared(fresh_registry):
    class Plugin:
        @hookimpl
        def cachekit_register_adapters(self, register):
            register(TinyVideoDiTAdapter)

    cachekit.register_plugin(Plugin(), "tiny-video-dit")
    assert not fresh_registry.errors
    return "tiny_video_dit"


@pytest.mark.parametrize(("strategy_name", "estimator", "dtype"), conformance.CELLS)
def test_a_spec_file_adapter_passes_the_conformance_checks(declared, strategy_name, estimator, dtype):
    conformance.test_never_reusing_is_bitwise_exact_and_remove_restores(declared, strategy_name, estimator, dtype)
    conformance.test_reusing_with_cfg_runs_and_counts_match_executions(declared, strategy_name, estimator, dtype)


def test_a_spec_file_adapter_provides_every_point(declared):
    conformance.test_adapter_provides_every_point_it_does_not_declare_missing(declared)
    conformance.test_reuse_at_a_nearly_identical_call_reproduces_the_computed_output(declared)


def test_spatial_and_temporal_sites_and_per_block_residuals(declared):
    model = TinyVideoDiT()
    adapter = cachekit.resolve_adapter(model)(model)
    assert [(site.name, site.kind.value, site.block) for site in adapter.attention_sites()] == [
        ("spatial_blocks.0.attn", "spatial", 0),
        ("spatial_blocks.0.cross", "cross", 0),
        ("temporal_blocks.0.attn", "temporal", 1),
        ("spatial_blocks.1.attn", "spatial", 2),
        ("spatial_blocks.1.cross", "cross", 2),
        ("temporal_blocks.1.attn", "temporal", 3),
    ]
    assert [len(segment) for segment in adapter.span().segments] == [1, 1, 1, 1]


def test_probe_is_the_modulated_input_block_0_attends_to(declared):
    model = TinyVideoDiT()
    adapter = cachekit.resolve_adapter(model)(model)
    seen = {}
    first = model.spatial_blocks[0]

    def on_block(_, args):
        seen.setdefault("probe", adapter.probe(args, {}))

    def on_attention(_, args):
        seen.setdefault("oracle", args[0])

    hooks = [first.register_forward_pre_hook(on_block), first.attn.register_forward_pre_hook(on_attention)]
    with torch.no_grad():
        model(torch.randn(2, 3, 6, 4), torch.tensor([700.0, 300.0]), torch.randn(2, 5, 8))
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(seen["probe"], seen["oracle"], rtol=0, atol=0)


def test_a_point_the_spec_declares_missing_fails_at_attach_naming_it(fresh_registry):
    table = read_table(SPEC_FILE)
    del table["probe"]
    table["missing"] = {"probe": "the modulation is fused into the attention kernel"}
    adapter = declare_adapter(table, TinyVideoDiT)
    assert not adapter.provides("probe")
    cachekit.register_plugin(
        type("Plugin", (), {"cachekit_register_adapters": hookimpl(lambda register: register(adapter))})
    )
    with pytest.raises(MissingPointError, match=r"'teacache' needs the 'probe' point.*TinyVideoDiT.*fused"):
        cachekit.apply(
            TinyVideoDiT(), TeaCacheConfig(rel_l1_thresh=0.1, coefficients=(1.0, 0.0), num_inference_steps=4)
        )
    uniform = cachekit.apply(TinyVideoDiT(), {"strategy": "uniform", "num_inference_steps": 4})
    uniform.remove()


def test_spec_mistakes_are_named():
    table = read_table(SPEC_FILE)
    with pytest.raises(TypeError, match="give a probe"):
        declare_adapter({key: value for key, value in table.items() if key != "probe"}, TinyVideoDiT)
    wrong_path = {**table, "blocks": [{**table["blocks"][0], "attention": {"atn": "spatial"}}, table["blocks"][1]]}
    with pytest.raises(ValueError, match="no block of 'spatial_blocks' has a module 'atn'"):
        declare_adapter(wrong_path, TinyVideoDiT)(TinyVideoDiT())
    with pytest.raises(ValidationError, match="must say where it returns each"):
        AdapterSpec.model_validate(
            {**table, "blocks": [{"path": "spatial_blocks", "streams": [{"name": "a"}, {"name": "b"}]}]}
        )
    with pytest.raises(ValidationError, match="'temporal' is both declared"):
        AdapterSpec.model_validate({**table, "missing_attention": {"temporal": "none"}})
    with pytest.raises(ValidationError, match="attention"):
        AdapterSpec.model_validate({**table, "blocks": [{**table["blocks"][0], "attention": {"attn": "diagonal"}}]})


def test_a_plugin_finds_its_spec_file_beside_its_module_wherever_it_is_run(tmp_path, monkeypatch):
    """A relative path is taken from the calling module's folder, not the working directory (which
    inside an installed plugin is the user's)."""
    import importlib.util
    import shutil

    package = tmp_path / "my_plugin"
    package.mkdir()
    shutil.copy(SPEC_FILE, package / "my_dit.toml")
    (package / "adapter.py").write_text(
        "from custom_dit import TinyVideoDiT\n"
        "from cachekit import declare_adapter\n"
        "Adapter = declare_adapter('my_dit.toml', TinyVideoDiT)\n"
    )
    monkeypatch.chdir(tmp_path.parent)  # anywhere but the plugin's folder
    module_spec = importlib.util.spec_from_file_location("my_plugin_adapter", package / "adapter.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    assert module.Adapter.spec == AdapterSpec.model_validate(read_table(SPEC_FILE))


def test_a_new_signal_is_an_adapter_declaration_and_the_strategy_that_reads_it(fresh_registry):
    """The spec declares the text projection's output as a signal; a strategy asks for it by
    name and gets, at each call, what the module returned (watched here with a plain torch hook)."""
    from strategies_for_tests import EveryThirdConfig

    from cachekit.adapter import Place
    from cachekit.strategy import Strategy

    table = read_table(SPEC_FILE)
    table["name"] = "tiny_video_dit_text"
    table["signals"] = {"text": {"module": "text"}}
    adapter = declare_adapter(table, TinyVideoDiT, EXAMPLE)
    seen, expected = [], []

    class ReadsText(Strategy[EveryThirdConfig]):
        config_class = EveryThirdConfig
        requires = frozenset({Place.SPAN, "text"})

        def decide_span(self, step, signals, state):
            seen.append(signals["text"])
            return True

    class Plugin:
        @hookimpl
        def cachekit_register_adapters(self, register):
            register(adapter)

        @hookimpl
        def cachekit_register_strategies(self, register):
            register(ReadsText)

    cachekit.register_plugin(Plugin(), "text-signal")
    example = EXAMPLE.build(adapter)
    example.model.text.register_forward_hook(lambda module, args, output: expected.append(output))
    with cachekit.apply(example.model, {"strategy": "every_third"}):
        for t in (900.0, 500.0):
            example(example.latents, t)
    assert len(seen) == len(expected) == 2 and all(a is b for a, b in zip(seen, expected, strict=True))
    with pytest.raises(MissingPointError, match=r"needs the 'texts' point.*exposes no such signal; its signals: "):
        ReadsText.requires = frozenset({Place.SPAN, "texts"})
        cachekit.apply(example.model, {"strategy": "every_third"})
