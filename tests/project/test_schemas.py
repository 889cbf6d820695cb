"""Strategy configs are pure data: validated, schema-exported, round-tripped, torch-free."""

from __future__ import annotations

import json
import subprocess
import sys

import pydantic
import pytest

import cachekit
from cachekit.schemas import StrategyConfig, UniformConfig


def test_json_round_trip_and_schema():
    config = UniformConfig(interval=3, warmup=2, num_inference_steps=20)
    assert UniformConfig.model_validate_json(config.model_dump_json()) == config
    schema = UniformConfig.model_json_schema()
    assert schema["properties"]["interval"]["minimum"] == 1
    assert schema["properties"]["strategy"]["const"] == "uniform"
    assert schema["additionalProperties"] is False


def test_configs_are_immutable():
    config = UniformConfig()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.interval = 5


def test_strategy_field_is_fixed():
    with pytest.raises(pydantic.ValidationError, match=r"strategy\n.*'uniform'"):
        UniformConfig(strategy="teacache")


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_config_files_and_names(tmp_path, suffix):
    path = tmp_path / f"strategy{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"strategy": "uniform", "interval": 4}))
    else:
        path.write_text('strategy = "uniform"\ninterval = 4\n')
    assert cachekit.make_config(path) == UniformConfig(interval=4)
    assert cachekit.make_config(str(path)) == UniformConfig(interval=4)
    assert cachekit.make_config("uniform") == UniformConfig()


def test_unreadable_config_file_suffix(tmp_path):
    path = tmp_path / "strategy.yaml"
    path.write_text("strategy: uniform")
    with pytest.raises(ValueError, match=r"strategy.yaml: a strategy config file must end in .json or .toml"):
        cachekit.make_config(path)


def test_every_registered_strategy_config_is_a_strategy_config():
    for name in cachekit.list_strategies():
        config_class = cachekit.get_strategy(name).config_class
        assert issubclass(config_class, StrategyConfig)
        assert config_class.registered_name() == name
        assert config_class.model_json_schema()["properties"]["strategy"]["const"] == name


def test_schemas_import_without_torch(tmp_path):
    code = "import sys, cachekit.schemas as s; s.UniformConfig(interval=2); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert result.stdout.strip() == "False"
