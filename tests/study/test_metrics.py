"""Metrics are plugins: a study computes the installed ones (a third-party package's included) on
every cell, skips with the reason those that cannot run here, and refuses up front one it is asked
for and cannot compute. Values are checked against computations written here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import cachekit
from cachekit.metric import Metric, MetricError, MetricWarning, Sample
from cachekit.study import StudySpecError, load_spec, plan, run_study
from cachekit.study.metrics import metrics_for
from cachekit.study.store import ResultStore

SPEC = """
name = "metrics"
models = ["flux-digits"]
labels = [3]
seeds = [0]
steps = 6
repeats = 1
warmup = 0
{metrics}

[[strategies]]
strategy = "uniform"
interval = 2
"""


def spec_file(tmp_path, metrics: str = ""):
    path = tmp_path / "spec.toml"
    path.write_text(SPEC.format(metrics=metrics))
    return path


def laplacian_variance(x: np.ndarray) -> float:
    """The sharpness plugin's figure, written with numpy slices: per image plane, the sample
    variance of the 4-neighbour Laplacian over the interior; the mean over planes."""
    planes = x.reshape(-1, *x.shape[-2:])
    lap = (
        planes[:, :-2, 1:-1]
        + planes[:, 2:, 1:-1]
        + planes[:, 1:-1, :-2]
        + planes[:, 1:-1, 2:]
        - 4 * planes[:, 1:-1, 1:-1]
    )
    return float(lap.reshape(len(planes), -1).var(axis=1, ddof=1).mean())


def test_a_third_party_metric_is_computed_on_every_cell(tmp_path):
    assert "sharpness" in cachekit.list_metrics(), "tests/plugins/sharpness must be installed (nox does)"
    db = run_study(load_spec(spec_file(tmp_path)), tmp_path / "r.sqlite", progress=False)
    store = ResultStore(db)
    rows = store.rows("metrics")
    assert len(rows) == 2
    for row in rows:
        output = load_file(store.samples / f"{row['sample']}.safetensors")["output"].double().numpy()
        assert row["metrics"]["sharpness"] == pytest.approx(laplacian_variance(output), rel=1e-9)
        assert row["sharpness"] == row["metrics"]["sharpness"]  # also under its own name
        assert "lpips skipped: torchvision is not installed" in row["notes"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A CLIP model and processor with random weights, saved as a local folder."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    text = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
        projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, image_size=16, patch_size=8,
        projection_dim=8,
    )  # fmt: skip
    torch.manual_seed(14)  # weights whose cosines come out positive: the scores below are not the floor
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8))
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
    )
    processor.save_pretrained(folder)
    return folder, model.eval(), processor


def clip_reference(model, processor, images: torch.Tensor, prompt: str) -> float:
    """CLIP score through the towers and projections one by one: 100 x mean cosine, floored at 0."""
    pixels = processor(images=[image for image in images], return_tensors="pt")["pixel_values"]
    tokens = processor(text=[prompt], return_tensors="pt", padding=True)
    with torch.no_grad():
        seen = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        read = model.text_projection(model.text_model(**tokens).pooler_output)
    cosine = torch.nn.functional.cosine_similarity(seen, read.expand_as(seen), dim=-1)
    return max(float(100 * cosine.mean()), 0.0)


def test_clip_score_from_a_local_model_in_a_study(tmp_path, tiny_clip):
    folder, model, processor = tiny_clip
    metrics = f'metrics = ["ssim", {{ name = "clip_score", model = "{folder}" }}]'
    db = run_study(load_spec(spec_file(tmp_path, metrics)), tmp_path / "r.sqlite", progress=False)
    store = ResultStore(db)
    for row in store.rows("metrics"):
        assert set(row["metrics"]) == {"psnr", "ssim", "clip_score"}  # PSNR always, then those asked for
        output = load_file(store.samples / f"{row['sample']}.safetensors")["output"]
        rgb = ((output + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
        expected = clip_reference(model, processor, rgb, row["condition"])
        assert row["clip_score"] == pytest.approx(expected, abs=1e-4) and expected > 0
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scorer = metrics_for([{"name": "clip_score", "model": str(folder)}]).active[1]
    for prompt in ("a red cat", "0 1 2 3 4 5 6 7 8 9"):
        got = scorer(Sample(images, images, prompt))
        bytes_ = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        assert got == pytest.approx(clip_reference(model, processor, bytes_, prompt), abs=1e-4) and got > 0


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ('metrics = ["lpipz"]', r"metrics: unknown metric 'lpipz'; installed metrics: clip_score, image_reward, lpips"),
        ('metrics = ["lpips"]', r"metrics: metric 'lpips' cannot run on this machine: torchvision is not installed"),
        (
            'metrics = [{ name = "clip_score", model = "/nowhere/clip" }]',
            r"metric 'clip_score' cannot run on this machine: the CLIP model '/nowhere/clip' is neither a local folder",
        ),
        ('metrics = [{ name = "ssim", window = 7 }]', r"metric 'ssim' takes no options; got window"),
        ('metrics = [{ name = "clip_score", modle = "x" }]', r"metric 'clip_score' takes model; got modle"),
    ],
)
def test_a_metric_that_cannot_run_is_refused_before_any_model_loads(tmp_path, monkeypatch, metrics, message):
    from cachekit import testbed

    monkeypatch.setattr(testbed, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(StudySpecError, match=message):
        plan(load_spec(spec_file(tmp_path, metrics)))


def test_metrics_unset_means_every_one_that_can_run_here():
    chosen = metrics_for(None)
    names = [metric.name for metric in chosen.active]
    assert names[0] == "psnr" and {"ssim", "ms_ssim", "sharpness"} <= set(names)
    assert chosen.skipped["lpips"] == "torchvision is not installed"
    assert "neither a local folder nor in the Hugging Face cache" in chosen.skipped["clip_score"]
    assert chosen.skipped["image_reward"] == "the image-reward package is not installed"


def test_a_metric_named_like_a_study_column_is_refused_where_a_study_would_use_it(fresh_registry):
    """Its values would be stored under its name beside the study's columns."""

    class Label(Metric):
        name = "label"

        def __call__(self, sample: Sample) -> float:
            return 0.0

    class Plugin:
        @cachekit.hookimpl
        def cachekit_register_metrics(self, register):
            register(Label)

    cachekit.register_plugin(Plugin(), "label-metric")
    column = "its name is a column of the study results; rename the metric"
    with pytest.raises(MetricError, match=f"metric 'label' cannot run on this machine: {column}"):
        metrics_for(["label"])
    assert metrics_for(None).skipped["label"] == column


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("Sharp Ness", r"Bad.name must be a lower-case name like 'clip_score', got 'Sharp Ness'"),
        ("psnr", r"registers metric 'psnr', which plugin 'cachekit.metrics.fidelity' already registered"),
    ],
)
def test_a_metric_plugin_with_a_bad_name_is_reported_by_name(fresh_registry, name, message):
    class Bad(Metric):
        def __call__(self, sample: Sample) -> float:
            return 0.0

    Bad.name = name

    class Plugin:
        @cachekit.hookimpl
        def cachekit_register_metrics(self, register):
            register(Bad)

    with pytest.warns(cachekit.registry.PluginWarning):
        cachekit.register_plugin(Plugin(), "bad-metric")
    assert re.search(message, fresh_registry.errors["bad-metric"])


class Distance(Metric):
    """Mean absolute difference to the uncached output: lower is better, as LPIPS."""

    name = "distance"
    better = "lower"

    def __call__(self, sample: Sample) -> float:
        return float((sample.output - sample.reference).abs().mean())


@pytest.fixture
def distance(fresh_registry):
    class Plugin:
        @cachekit.hookimpl
        def cachekit_register_metrics(self, register):
            register(Distance)

    cachekit.register_plugin(Plugin(), "distance-metric")


def test_a_lower_is_better_plugin_metric_as_the_primary_ranks_the_report(tmp_path, distance):
    """The budget table's winner is the setting of least distance, computed here from the cells."""
    from cachekit.study import write_report
    from cachekit.study.report import budget_tables, summarize

    spec = SPEC.format(metrics='primary = "distance"\nmetrics = []').replace("interval = 2", "sweep.interval = [2, 3]")
    (tmp_path / "spec.toml").write_text(spec + '\n[[strategies]]\nstrategy = "taylorseer"\nlevel = "span"\n')
    db = run_study(load_spec(tmp_path / "spec.toml"), tmp_path / "r.sqlite", progress=False)
    rows = ResultStore(db).rows("metrics")
    assert all(set(row["metrics"]) == {"distance"} for row in rows)  # the primary alone, first
    summaries = summarize(rows, "distance")
    cached = [s for s in summaries if s.setting != "uncached"]
    best = min(cached, key=lambda s: s.metrics["distance"])
    table = "\n".join(budget_tables(summaries, budgets=(1.0,)))
    assert "best distance within a share of block executions" in table
    assert f"| {best.method} | **{best.metrics['distance']:.4f}** |" in table
    report = write_report(db, tmp_path / "report").read_text()
    assert "best distance within" in report and "PSNR" not in report.split("## Which method wins")[1].split("!")[0]


def test_tune_bounds_a_lower_is_better_primary_from_above(distance):
    """At most the bound: the most reusing setting at or below it (an interval of 1 reuses nothing)."""
    from cachekit.schemas import CalibrationSpec
    from cachekit.study.models import TestbedModel
    from cachekit.tune import Tuner

    model = TestbedModel("flux-digits", CalibrationSpec(model="flux-digits", labels=[5], steps=6, order=2))
    tuner = Tuner(model, {"strategy": "uniform"}, seeds=[1000], conditions=["5"], primary="distance")
    result = tuner.to_quality(0.01)
    assert result.metric == "distance" and result.trials[0].quality == 0.0  # interval 1: exact
    assert result.met and result.chosen.quality <= 0.01
    assert all(t.quality > 0.01 for t in result.trials if t.computed < result.chosen.computed)


class Wayward(Metric):
    """A plugin metric with a bug: raises on cached cells, returns what is not a number on others."""

    name = "wayward"
    returns: object = None

    def __call__(self, sample: Sample) -> float:
        if not torch.equal(sample.output, sample.reference):
            raise ZeroDivisionError("division by zero")
        return self.returns  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("returns", "described"),
    [
        ("0.5", r"returned '0\.5' \(str\)"),
        (None, r"returned None \(NoneType\)"),
        (torch.ones(2), r"returned tensor\(\[1\., 1\.\]\) \(Tensor\)"),
    ],
)
def test_a_metric_that_fails_or_returns_no_number_is_named_and_the_cells_kept(
    tmp_path, fresh_registry, returns, described
):
    Wayward.returns = returns

    class Plugin:
        @cachekit.hookimpl
        def cachekit_register_metrics(self, register):
            register(Wayward)

    cachekit.register_plugin(Plugin(), "wayward-metric")
    with pytest.warns(MetricWarning) as warned:
        db = run_study(load_spec(spec_file(tmp_path, 'metrics = ["wayward"]')), tmp_path / "r.sqlite", progress=False)
    messages = [str(warning.message) for warning in warned if warning.category is MetricWarning]
    assert len(messages) == 1 and re.match(rf"metric 'wayward' {described}; a metric returns a number", messages[0])
    rows = {row["setting"]: row for row in ResultStore(db).rows("metrics")}
    assert len(rows) == 2 and all(row["metrics"]["wayward"] is None for row in rows.values())
    cached = next(row for setting, row in rows.items() if setting != "uncached")
    assert (
        cached["metrics"]["psnr"] > 0 and Path(db).with_suffix(".samples").joinpath(cached["sample"] + ".png").is_file()
    )
    assert "metric 'wayward' raised ZeroDivisionError: division by zero" in json.loads(cached["notes"])
    assert any(re.match(rf"metric 'wayward' {described}", note) for note in json.loads(rows["uncached"]["notes"]))
