"""Study, calibration and tuning input that is wrong is refused by name before anything runs, saying what is allowed."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from bad_input import BASE_STUDY, V, run_spec, study_spec

import cachekit
from cachekit.metric import MetricError
from cachekit.schemas import (
    CalibrationSpec,
)
from cachekit.study import StudySpecError, load_spec, plan, write_report
from cachekit.study.metrics import metrics_for
from cachekit.study.store import ResultStore, StoreError
from cachekit.tune import check_target


def with_reference(tmp: Path, damage: Any) -> None:
    """A database holding one uncached cell whose files `damage` changes; then read its reference."""
    store = ResultStore(tmp / "r.sqlite")
    row = {"study": "s", "model": "m", "setting": "uncached", "seed": 0, "condition": "c", "label": "uncached"}
    store.add({**row, "strategy": "uncached", "latency_s": 1.0}, torch.zeros(1, 3, 4, 4))
    damage(store.samples)
    store.reference("s", "m", 0, "c")


def truncate(samples: Path) -> None:
    tensor = next(samples.rglob("*.safetensors"))
    tensor.write_bytes(tensor.read_bytes()[:40])


def full_disk(tmp: Path) -> None:
    import errno

    from cachekit.study import store

    def no_space(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    row = {"study": "s", "model": "m", "setting": "uncached", "seed": 0, "condition": "c", "label": "uncached"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store, "write_sample", no_space)
        ResultStore(tmp / "r.sqlite").add({**row, "strategy": "uncached", "latency_s": 1.0}, torch.zeros(1, 3, 4, 4))


def read_only_preset(tmp: Path) -> None:
    from cachekit.tune import preset_file

    (tmp / "mine.json").write_text("{}")
    with pytest.MonkeyPatch.context() as patch:  # as root, chmod alone would not stop a write
        patch.setattr("os.access", lambda path, mode: False)
        preset_file({"strategy": "teacache", "preset": str(tmp / "mine.json")})


def unet_study(tmp: Path) -> None:
    folder = tmp / "sd15"
    folder.mkdir()
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (folder / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderKL"]}))
    plan(
        load_spec(
            study_spec(tmp, f'models = ["{folder}"]\nprompts = ["a cat"]\n[[strategies]]\nstrategy = "uniform"\n')
        )
    )


CASES = [
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
        "study reference file truncated",
        lambda t: with_reference(t, truncate),
        StoreError,
        r"uncached reference for m seed=0 'c' in study 's' cannot be read from \S+/r\.samples/s/m/uncached/"
        r"c-seed0\.safetensors \(.*\): the file is damaged .*run with --fresh",
    ),
    (
        "study samples folder deleted",
        lambda t: with_reference(t, lambda samples: __import__("shutil").rmtree(samples)),
        StoreError,
        r"uncached reference for m seed=0 'c' in study 's' was recorded, but its file \S+c-seed0\.safetensors is "
        r"gone .*put it back, or run with --fresh",
    ),
    (
        "study disk full while writing a sample",
        lambda t: full_disk(t),
        StoreError,
        r"cannot write the output of m 'uncached' seed=0 'c' into \S+r\.samples: No space left on device; the "
        r"cells finished before it are kept",
    ),
    (
        "study device without CUDA",
        lambda t: run_spec(t, 'device = "cuda:99"\n[[strategies]]\nstrategy = "uniform"\n'),
        StudySpecError,
        r"device 'cuda:99': (torch sees no CUDA device on this machine \(torch .*\); set device = 'cpu'|this "
        r"machine has \d+ CUDA devices)",
    ),
    (
        "study label the testbed does not generate",
        lambda t: plan(
            load_spec(study_spec(t, BASE_STUDY.replace("[1]", "[12]") + '[[strategies]]\nstrategy = "uniform"\n'))
        ),
        StudySpecError,
        r"labels \[12\]: testbed model 'flux-digits' \(models\[0\]\) generates the digits 0 to 9",
    ),
    (
        "testbed pipeline label out of range",
        lambda t: cachekit.testbed.load("flux-digits", trained=False)(labels=[3, 12], num_inference_steps=2),
        ValueError,
        r"labels \[3, 12\]: the testbed models generate the digits 0 to 9",
    ),
    (
        "study magcache ratios for another step count",
        lambda t: (
            run_spec(t, '[[strategies]]\nstrategy = "magcache"\nmag_ratios = [1.0, 0.9, 0.8]\n') or pytest.fail("ran")
        ),
        StudySpecError,
        r"magcache.* cannot run on flux-digits: MagCache has 3 magnitude ratios but the generation has 4 steps",
    ),
    (
        "tune --write to a read-only preset",
        read_only_preset,
        ValueError,
        r"--write: the preset file '\S+mine\.json' is read-only: make it writable, or copy it and tune the copy "
        r"\(checked before tuning",
    ),
    (
        "study of a UNet pipeline folder",
        unet_study,
        StudySpecError,
        r"models\[0\]: '\S+sd15' is a StableDiffusionPipeline without a transformer \(it holds unet, vae\): "
        r"cachekit caches diffusion transformers",
    ),
    (
        "study field typo",
        lambda t: load_spec(study_spec(t, BASE_STUDY + 'negative_promt = "blurry"\n')),
        StudySpecError,
        r"negative_promt\n  unknown field \(did you mean 'negative_prompt'\?\); StudySpec takes: .*negative_prompt",
    ),
    (
        "study strategy field typo",
        lambda t: plan(
            load_spec(study_spec(t, BASE_STUDY + '[[strategies]]\nstrategy = "teacache"\nthreshold = 0.1\n'))
        ),
        StudySpecError,
        r"threshold\n  unknown field \(did you mean 'rel_l1_thresh'\?\); TeaCacheConfig takes: ",
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
        r"strategy 'pab' declares no knob to tune; strategies with one: easycache, fbcache, magcache, schedule, "
        "seacache, taylorseer, teacache, uniform",
    ),
]


@pytest.mark.parametrize(("make", "error", "message"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_named(tmp_path, fresh_registry, make, error, message):
    with pytest.raises(error, match=rf"(?s){message}"):
        make(tmp_path)


def test_the_table_keeps_its_cases():
    assert len(CASES) >= 15  # the table the bad-input tests were split from held 77 cases in all


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
        (
            ["study", "run", "default", "--threads", "0"],
            r"--threads: give a whole number of threads, 1 or more, got '0'",
        ),
        (
            ["tune", str(spec), "--strategy", '{"strategy": "uniform"}', "--ratio", "0.4", "--save", "b.json"],
            r"cachekit: error: --save stores the setting chosen for a budget: give --budget too",
        ),
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


def test_true_cfg_without_a_negative_prompt_is_warned_and_with_one_is_not(tmp_path):
    from cachekit.study.plan import StudyWarning

    spec = 'name = "t"\nmodels = ["org/flux"]\nprompts = ["a cat"]\ntrue_cfg_scale = 3.0\n'
    spec += '[[strategies]]\nstrategy = "uniform"\n'
    with pytest.warns(
        StudyWarning,
        match=r"models\[0\] \(org/flux\): true_cfg_scale = 3\.0 without a negative_prompt: diffusers runs true CFG "
        r"only with a negative prompt.*set negative_prompt",
    ):
        plan(load_spec(study_spec(tmp_path, spec)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", StudyWarning)
        plan(load_spec(study_spec(tmp_path, spec.replace("true_cfg_scale", 'negative_prompt = ""\ntrue_cfg_scale'))))
