"""The example in examples/ runs as shipped."""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT

EXAMPLES = ROOT / "examples"


def test_quickstart_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert (
        "strategies: ['easycache', 'fastercache', 'fbcache', 'magcache', 'pab', 'schedule', 'seacache', 'taylorseer'"
        in result.stdout
    )
    assert "estimator=TaylorConfig(kind='taylor', dtype=None, order=2" in result.stdout
    uniform = "20 calls, span 8 computed / 12 reused, schedule C..C..C..C..C..C..CC"  # interval 3, last step
    assert f"branch 0 (cond): {uniform}" in result.stdout and f"branch 1 (uncond): {uniform}" in result.stdout
    assert "  preset: flux-dev\n" in result.stdout and "  rel_l1_thresh: 0.4\n" in result.stdout
    assert "after removal: output identical to the uncached pipeline" in result.stdout
