"""Studies of real diffusers pipelines saved with `save_pretrained`, as a user's would be: an
image model with true CFG, a video model and an image-to-video model, each with its own settings
and pipeline arguments, prompts and negative prompts; every sample opens as PNG or MP4, and
`study export` lays them out per setting."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, WanPipeline
from PIL import Image
from safetensors.torch import load_file

from cachekit.study import StudySpecError, load_spec, plan, run_study
from cachekit.study.export import export
from cachekit.study.models import CallSignature, call_arguments, load_model
from cachekit.study.samples import as_bytes
from cachekit.study.store import ResultStore
from cachekit.testing import tiny_flux_pipeline, tiny_wan_i2v_pipeline, tiny_wan_pipeline

STEPS = 4

SPEC = """
name = "pipelines"
prompts = ["a red cat", "a blue dog"]
negative_prompt = "blurry"
seeds = [0, 1]
steps = 4
repeats = 1
warmup = 0
frames = 5                                   # the video models' length; the image model takes none
pipeline_kwargs = { max_sequence_length = 16 }

[[models]]
name = "flux"
height = 32
width = 32
true_cfg_scale = 3.0

[[models]]
name = "wan"
height = 16
width = 16
guidance_scale = 5.0
fps = 4

[[models]]
name = "wan-i2v"
image = "first-frame.png"
height = 16
width = 16
guidance_scale = 5.0

[[strategies]]
strategy = "uniform"
interval = 2

[[strategies]]
strategy = "fbcache"
threshold = 0.3
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The three pipelines saved as folders, an input image, and the spec beside them."""
    folder = tmp_path_factory.mktemp("pipelines")
    for name, pipe in [
        ("flux", tiny_flux_pipeline()),
        ("wan", tiny_wan_pipeline()),
        ("wan-i2v", tiny_wan_i2v_pipeline()),
    ]:
        pipe.save_pretrained(folder / name)
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "first-frame.png")
    (folder / "spec.toml").write_text(
        SPEC.replace('name = "flux"', f'name = "{folder / "flux"}"')
        .replace('name = "wan"', f'name = "{folder / "wan"}"')
        .replace('name = "wan-i2v"', f'name = "{folder / "wan-i2v"}"')
    )
    return folder


@pytest.fixture(scope="module")
def finished(folder):
    db = run_study(load_spec(folder / "spec.toml"), folder / "results.sqlite", progress=False)
    return db, ResultStore(db).rows("pipelines")


def test_every_cell_ran_with_its_models_settings(finished, folder):
    _, rows = finished
    assert len(rows) == 3 * 2 * 2 * 3  # models x seeds x prompts x (uncached + 2 settings)
    for row in rows:
        # true CFG (Flux) and CFG (Wan) with the negative prompt: two transformer calls per step
        assert row["calls"] == 2 * STEPS, row["model"]
        assert row["metrics"]["psnr"] == (float("inf") if row["setting"] == "uncached" else row["psnr"])
    uniform = [row for row in rows if row["strategy"] == "uniform"]
    assert all(row["reused_calls"] == 2 for row in uniform)  # steps 1 of 0-3, both branches


def test_samples_open_as_png_and_mp4_and_equal_the_tensors(finished, folder):
    db, rows = finished
    samples = ResultStore(db).samples
    for row in rows:
        files = json.loads(row["files"])
        tensor = load_file(samples / f"{row['sample']}.safetensors")["output"]
        if row["model"].endswith("flux"):
            (png,) = [name for name in files if name.endswith(".png")]
            with Image.open(samples / png) as image:
                assert image.size == (32, 32) and image.mode == "RGB"
                assert np.array_equal(np.asarray(image), as_bytes(tensor[0]))  # lossless
        else:
            (mp4,) = [name for name in files if name.endswith(".mp4")]
            with av.open(str(samples / mp4)) as video:
                stream = video.streams.video[0]
                frames = [frame.to_ndarray(format="rgb24") for frame in video.decode(stream)]
                assert stream.codec_context.name == "h264" and stream.average_rate == (4 if "wan/" in mp4 else 8)
            assert len(frames) == 5 and frames[0].shape == (16, 16, 3)
            expected = np.stack([as_bytes(tensor[0, :, index]) for index in range(5)]).astype(float)
            assert np.abs(np.stack(frames).astype(float) - expected).mean() < 12  # H.264, lossy
        assert tensor.shape[0] == 1 and tensor.min() >= -1 and tensor.max() <= 1


def test_the_image_to_video_model_generates_from_the_spec_image(folder):
    """The input image reaches the pipeline: another image, another video from the same seed."""
    spec = load_spec(folder / "spec.toml")
    name = spec.models[2].name
    other = folder / "other-frame.png"
    Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8)).save(other)
    generation = spec.generation(name)
    videos = [
        load_model(name, generation.model_copy(update={"image": str(image)})).generate(0, "a red cat")
        for image in (folder / "first-frame.png", folder / "first-frame.png", other)
    ]
    assert torch.equal(videos[0], videos[1]) and not torch.equal(videos[0], videos[2])


def test_export_lays_out_one_folder_per_setting_one_file_per_prompt_and_seed(finished, folder):
    db, rows = finished
    out = folder / "export"
    index = export(db, out)
    wan = out / "wan"
    assert sorted(path.name for path in wan.iterdir()) == ["fbcache", "uncached", "uniform"]
    assert sorted(path.name for path in (wan / "uniform").iterdir()) == [
        "a blue dog-0.mp4",
        "a blue dog-1.mp4",
        "a red cat-0.mp4",
        "a red cat-1.mp4",
    ]
    assert (out / "flux" / "fbcache" / "a red cat-1.png").is_file()
    with index.open() as file:
        lines = list(csv.DictReader(file))
    assert len(lines) == len(rows)
    line = next(line for line in lines if line["file"] == "wan-i2v/uniform/a red cat-1.mp4")
    assert line["seed"] == "1" and line["condition"] == "a red cat" and float(line["ssim"]) < 1
    assert float(line["latency_min_s"]) <= float(line["latency_s"]) <= float(line["latency_max_s"])
    command = [sys.executable, "-m", "cachekit", "study", "export", str(db), "--out", str(folder / "again")]
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True, check=True)
    assert "index.csv" in result.stdout and (folder / "again" / "wan" / "uncached" / "a blue dog-0.mp4").is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("true_cfg_scale = 3.0", "true_cfg_scale = 3.0\nframes = 9"), r"FluxPipeline does not take frames"),
        (
            ("max_sequence_length = 16", "max_sequence_lenght = 16"),
            r"does not take pipeline_kwargs.max_sequence_lenght \(did you mean 'max_sequence_length'\?\)",
        ),
        (("max_sequence_length = 16", "num_inference_steps = 3"), r"num_inference_steps: the study sets it"),
        (('image = "first-frame.png"', 'image = "missing.png"'), r"image '.*missing.png': no such file"),
        (("fps = 4", 'device = "cuda:x"'), r"device\n.*String should match pattern"),
    ],
)
def test_a_spec_mistake_about_a_pipeline_is_named_before_any_model_loads(folder, monkeypatch, change, message):
    import diffusers

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    broken = folder / "broken.toml"
    broken.write_text((folder / "spec.toml").read_text().replace(*change))
    with pytest.raises(StudySpecError, match=rf"(?s){message}"):
        plan(load_spec(broken))


def test_each_model_gets_the_studys_settings_overridden_by_its_own(folder):
    spec = load_spec(folder / "spec.toml")
    flux, wan, i2v = (spec.generation(model.name) for model in spec.models)
    assert (flux.true_cfg_scale, flux.height, flux.frames, flux.negative_prompt) == (3.0, 32, 5, "blurry")
    assert (wan.guidance_scale, wan.fps, wan.pipeline_kwargs) == (5.0, 4, {"max_sequence_length": 16})
    assert i2v.image == str(folder / "first-frame.png")  # relative to the spec file
    # the top-level frames reach the video models only
    assert "num_frames" not in call_arguments(flux, CallSignature.of(FluxPipeline))
    assert call_arguments(wan, CallSignature.of(WanPipeline))["num_frames"] == 5


def test_a_setting_that_cannot_run_on_the_second_model_fails_before_the_first_cell(folder, tmp_path):
    """flux-dev's TeaCache preset fits the testbed's Flux model but not a Wan model: the study stops
    before computing anything, naming the model, though the Wan model comes second."""
    spec = tmp_path / "two.toml"
    spec.write_text(
        f'''models = ["flux-digits", "{folder / "wan"}"]
labels = [3]
prompts = ["a red cat"]
steps = 4
frames = 5

[[strategies]]
strategy = "teacache"
preset = "flux-dev"
rel_l1_thresh = 0.2
'''
    )
    with pytest.raises(
        StudySpecError,
        match=rf"teacache cannot run on {folder / 'wan'}: TeaCache preset 'flux-dev' was made on a 'flux' model",
    ):
        run_study(load_spec(spec), tmp_path / "r.sqlite", progress=False)
    assert ResultStore(tmp_path / "r.sqlite").rows() == []
