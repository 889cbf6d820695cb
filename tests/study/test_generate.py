"""`cachekit generate`: one generation under a strategy beside the uncached one."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from cachekit.generate import generate, save
from cachekit.study import StudySpecError
from cachekit.testing import tiny_flux_pipeline


def test_the_command_prints_the_summary_speedup_and_psnr_and_saves_the_image(tmp_path):
    command = [
        sys.executable,
        "-m",
        "cachekit",
        "generate",
        "flux-digits",
        "--strategy",
        '{"strategy": "uniform", "interval": 3}',
        "--label",
        "3",
        "--steps",
        "12",
        "--out",
        str(tmp_path / "three.png"),
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "uniform on flux\n  settings: interval=3, warmup=1" in result.stdout
    assert "schedule C..C..C..C.C," in result.stdout
    assert re.search(r"uncached \d+\.\d+ s, cached \d+\.\d+ s: \d+\.\d+x speedup, PSNR \d+\.\d+ dB", result.stdout)
    with Image.open(tmp_path / "three.png") as image:
        assert image.size == (16, 16)


def test_a_pipeline_folder_from_a_prompt_matches_its_uncached_run_when_nothing_is_reused(tmp_path):
    tiny_flux_pipeline().save_pretrained(tmp_path / "flux")
    settings = {"steps": 4, "height": 32, "width": 32, "pipeline_kwargs": {"max_sequence_length": 16}}
    result = generate(str(tmp_path / "flux"), {"strategy": "uniform", "interval": 1}, "a cat", warmup=0, **settings)
    assert torch.equal(result.output, result.reference) and result.psnr == float("inf")
    assert "  generation 1 of 1, 4 steps:" in result.summary
    with pytest.raises(ValueError, match=r"--out .*cat\.mp4: the model made an image, saved as \.png; give a path"):
        save(result.output, tmp_path / "cat.mp4")
    assert save(result.output, tmp_path / "cat.png").is_file()


def test_a_condition_the_model_does_not_take_is_named_before_it_loads():
    with pytest.raises(
        StudySpecError, match=r"labels \[12\]: testbed model 'flux-digits' \(generate\) generates the digits"
    ):
        generate("flux-digits", "uniform", "12")
