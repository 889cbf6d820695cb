"""Fair comparison of cache strategies: the same latents, the uncached reference, measured speed and
quality, results in SQLite as each cell finishes."""

from cachekit.study.plan import Cell, Plan, Setting, StudySpecError, load_spec, plan
from cachekit.study.report import write_report
from cachekit.study.runner import merge, run_study
from cachekit.study.store import ResultStore

__all__ = [
    "Cell",
    "Plan",
    "ResultStore",
    "Setting",
    "StudySpecError",
    "load_spec",
    "merge",
    "plan",
    "run_study",
    "write_report",
]
