"""The example in examples/ runs as shipped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_quickstart_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert "strategies: ['easycache', 'fbcache', 'magcache', 'pab', 'seacache', 'taylorseer'" in result.stdout
    assert "estimator=TaylorConfig(kind='taylor', order=2" in result.stdout
    assert result.stdout.count("span 8 computed / 12 reused  C..C..C..C..C..C..CC") >= 2  # uniform(3), 2 branches
    assert "after removal: output identical to the uncached pipeline" in result.stdout
