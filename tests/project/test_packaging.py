"""The wheel installs `cachekit` and nothing else at the top level."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from helpers import ROOT


def test_wheel_has_only_the_cachekit_top_level_package(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--wheel-dir",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("dit_cachekit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"cachekit"}
    shipped = [
        "schemas/configs.py",
        "schemas/teacache_presets.toml",
        "strategies/uniform.py",
        "adapters/flux.py",
        "adapters/wan.py",
        "py.typed",
        "testbed/weights/flux-digits.safetensors",
        "testbed/weights/wan-moving-digits.safetensors",
        "testbed/weights/digit-classifier.safetensors",
    ]
    for module in shipped:
        assert f"cachekit/{module}" in names
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[cachekit]" in text and "strategies = cachekit.strategies" in text
