"""Every code block of the README and of the docs site runs, or is checked, as written: each block
is matched to how it is tested here (or to the test that runs it), and a block nobody handles
fails the test. Only what cannot run offline on a CPU is substituted, and each substitution is
listed below: a hub model becomes the tiny offline pipeline of its class, `cuda` the CPU, and
50-step studies 6. The README stays a front door (at most 150 lines), and the site's home page is
the README with its links made relative."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest
from helpers import ROOT, TESTS

import cachekit
from cachekit.schemas import AdapterSpec, CalibrationSpec
from cachekit.study import load_spec, plan

README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLUGINS = ROOT / "tests" / "plugins"


def blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block of the README and the docs, each once."""
    found = [block for page in PAGES for block in re.findall(r"```(\w+)\n(.*?)```", page.read_text(), flags=re.S)]
    return list(dict.fromkeys(found))


def test_the_readme_is_a_front_door_and_the_site_s_home_page():
    assert len(README.splitlines()) <= 150
    assert (ROOT / "docs" / "index.md").read_text() == README.replace("](docs/", "](")
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", README))
    nav = (ROOT / "mkdocs.yml").read_text()
    assert linked and all(page in nav and (ROOT / "docs" / page).is_file() for page in linked)


def block(first_line: str) -> str:
    (found,) = [code for _, code in blocks() if code.startswith(first_line)]
    return found


#: Blocks run by other tests, by their first line.
ELSEWHERE = {
    "transformer.enable_parallelism": "tests/test_context_parallel.py runs both orders under real context parallelism",
    "torchrun --nproc-per-node 8": "tests/test_many_processes.py runs both commands under torchrun",
    "# cachekit_damped/__init__.py": "test_registry.py: the installed plugin's source, word for word",
}


def test_every_block_is_handled():
    handled = [*HANDLERS, *ELSEWHERE]
    unhandled = [code.splitlines()[0] for _, code in blocks() if not any(code.startswith(h) for h in handled)]
    assert not unhandled, f"README blocks no test runs: {unhandled}"


def run_python(code: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def on_the_cpu(code: str) -> str:
    """The hub's FLUX.1-dev on a GPU -> the tiny FluxPipeline on the CPU, at its size."""
    code = code.replace(
        'FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16).to("cuda")',
        "__import__('cachekit.testing').testing.tiny_flux_pipeline()",
    ).replace("num_inference_steps=28)", "num_inference_steps=28, height=32, width=32, max_sequence_length=16)")
    assert "tiny_flux_pipeline" in code and "height=32" in code
    return code


def test_front_door(tmp_path):
    """The budget's three blocks in order, on the tiny FluxPipeline saved as a folder on the CPU:
    tune at 30% on the held-out seeds, save, then apply by budget and print the stats."""
    from cachekit.testing import tiny_flux_pipeline

    tiny_flux_pipeline().save_pretrained(tmp_path / "flux")
    spec = block("# flux-dev.toml").replace('"black-forest-labs/FLUX.1-dev"', f'"{tmp_path / "flux"}"')
    spec = spec.replace('device = "cuda"', 'device = "cpu"').replace('dtype = "bfloat16"', 'dtype = "float32"')
    spec += "height = 32\nwidth = 32\npipeline_kwargs = { max_sequence_length = 16 }\n"
    (tmp_path / "flux-dev.toml").write_text(spec)
    (tune,) = commands("cachekit tune flux-dev.toml")
    result = subprocess.run(tune, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "saved to flux-dev-budgets.json" in result.stdout
    printed = run_python(on_the_cpu(block("import torch\nfrom diffusers import FluxPipeline")), tmp_path)
    assert "teacache on flux" in printed and "  preset: flux-dev\n" in printed
    assert re.search(r"  budget: 30% tuned at 28 steps: rel_l1_thresh=\S+, spent \d+\.\d% and psnr", printed), printed
    assert "branch 0 (cond): 28 calls" in printed


def test_study_command():
    """The front door's study command is one the CLI takes (the studies page runs them)."""
    from cachekit.cli import parser

    (line,) = commands("cachekit study run default --report")
    args = parser().parse_args(line.split()[3:])
    assert (args.command, args.action, str(args.spec), args.report) == ("study", "run", "default", True)


def test_use(tmp_path):
    code = block("# a config object, and the counts of one site")
    printed = run_python(on_the_cpu(code), tmp_path)
    assert "SiteCounts(computed=15, reused=13)" in printed  # what the block's comment says
    assert "uniform on flux" in printed and "schedule C.C.C.C.C.C.C.C.C.C.C.C.C.CC" in printed


def test_testbed(tmp_path):
    printed = run_python(block("import torch\nfrom cachekit import testbed"), tmp_path)
    assert re.search(r"Score\(accuracy=", printed), printed


def install_plugin(site: Path, source: str, entry_points: str) -> dict[str, str]:
    """`my_cache` installed in `site` as pip would leave it (the package and its dist-info with the
    entry points), and the environment of a process that has `site` on its path."""
    (site / "my_cache").mkdir(parents=True)
    (site / "my_cache" / "__init__.py").write_text(source)
    info = site / "my_cache-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-cache\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    return {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}


def test_plugin_strategy(monkeypatch):
    module = types.ModuleType("my_cache")
    monkeypatch.setitem(sys.modules, "my_cache", module)  # as an installed package would be
    exec(block("# my_cache/__init__.py"), module.__dict__)
    registry = cachekit.registry.Registry()
    registry.load_entry_points()
    registry.add(module, "my_cache")
    assert not registry.errors and "every_nth" in registry.strategies
    (entry_point,) = tomllib.loads(block("# pyproject.toml"))["project"]["entry-points"]["cachekit"].items()
    assert entry_point == ("every_nth", "my_cache")
    strategy = registry.strategies["every_nth"](module.EveryNthConfig())
    steps = [types.SimpleNamespace(index=i, is_last=i == 6) for i in range(7)]
    assert [strategy.decide_span(step, None, None) for step in steps] == [True, False, False, True, False, False, True]


@pytest.mark.slow
def test_the_plugin_strategy_installed_passes_the_shipped_conformance_matrix(tmp_path):
    entry_points = "[cachekit]\nevery_nth = my_cache\n"
    env = install_plugin(tmp_path / "site", block("# my_cache/__init__.py"), entry_points)
    command = [sys.executable, "-m", "pytest", "--pyargs", "cachekit.conformance", "-q", "-p", "no:cacheprovider"]
    result = subprocess.run([*command, "-k", "every_nth"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    passed = int(re.search(r"(\d+) passed", result.stdout).group(1))
    assert passed >= 2 * 3 * 19 and "failed" not in result.stdout  # 2 tests x 3 cells x every adapter


def test_a_plugin_strategy_without_example_configs_fails_the_matrix(tmp_path):
    source = block("# my_cache/__init__.py")
    start = source.index("    @classmethod")
    source = source[:start] + source[source.index("    def decide_span") :]
    env = install_plugin(tmp_path / "site", source, "[cachekit]\nevery_nth = my_cache\n")
    command = [sys.executable, "-m", "pytest", "--pyargs", "cachekit.conformance", "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(
        [*command, "-k", "every_nth and flux-"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 1 and "skipped" not in result.stdout, result.stdout[-3000:]
    assert "strategy 'every_nth' ships no example configs: give it example_configs()" in result.stdout


def test_plugin_metric_is_the_installed_test_plugin():
    snippet = block("# cachekit_sharpness/__init__.py").split("\n", 1)[1]
    assert snippet in (PLUGINS / "sharpness" / "cachekit_sharpness" / "__init__.py").read_text()
    assert "sharpness" in cachekit.list_metrics()


def test_declared_adapter(tmp_path):
    from custom_dit import TinyVideoDiT

    (tmp_path / "my_dit.toml").write_text(block("# my_dit.toml"))
    code = block("from cachekit import declare_adapter, hookimpl")
    module = types.ModuleType("my_dit_plugin")
    module.__dict__.update(MyDiT=TinyVideoDiT, __file__=str(tmp_path / "plugin.py"))
    exec(compile(code, str(tmp_path / "plugin.py"), "exec"), module.__dict__)  # the spec found beside it
    registry = cachekit.registry.Registry()
    registry.add(module, "my_dit")
    assert not registry.errors and registry.adapters["my_dit"].spec == AdapterSpec.model_validate(
        tomllib.loads(block("# my_dit.toml"))
    )


def test_study_specs_plan(tmp_path):
    """The study specs plan as written (hub models are checked by name: no cache here)."""
    for first in ("# study.toml", "# pipelines.toml"):
        path = tmp_path / first.removeprefix("# ")
        path.write_text(block(first))
        assert plan(load_spec(path)).cells
    calibration = CalibrationSpec.model_validate(tomllib.loads(block("# calibration.toml")))
    assert calibration.model == "flux-digits" and calibration.held_out_seeds == [1000, 1001]


@pytest.mark.slow
def test_study_commands(tmp_path):
    """The commands of the study section, on its study.toml at 6 steps."""
    (tmp_path / "study.toml").write_text(block("# study.toml").replace("steps = 50", "steps = 6\nrepeats = 1"))
    for line in commands("cachekit study run study.toml"):
        result = subprocess.run(line, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, (line, result.stderr[-3000:])
    assert (tmp_path / "results-report" / "report.md").is_file()
    assert (tmp_path / "results-export" / "flux-digits" / "uncached" / "3-1.png").is_file()


@pytest.mark.slow
def test_calibration_commands(tmp_path):
    """The calibrate and tune commands, on the README's calibration.toml cut to 1 label and 10 steps."""
    spec = block("# calibration.toml").replace("labels = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]", "labels = [3]")
    (tmp_path / "calibration.toml").write_text(spec.replace("steps = 50", "steps = 10"))
    for line in commands("cachekit calibrate calibration.toml"):
        result = subprocess.run(line, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, (line, result.stderr[-3000:])
    assert (tmp_path / "flux-digits.png").is_file()
    assert cachekit.schemas.load_preset(str(tmp_path / "flux-digits.json")).thresholds


def test_setup_commands_name_real_sessions():
    """`nox` is what CI runs; `nox -s demo` and the sessions the pages name exist; the install
    lines install from the checkout (cachekit is not on PyPI)."""
    noxfile = (ROOT / "noxfile.py").read_text()
    for page in PAGES:
        for session in re.findall(r"nox -s (\w+)", page.read_text()):
            assert f"def {session}(session" in noxfile, (page.name, session)
    install = commands("pip install torch")
    assert install[1] == 'pip install ".[pipelines]"' and install[2].endswith("-m cachekit --version")
    assert "pipelines = [" in (ROOT / "pyproject.toml").read_text()


def test_a_built_in_method_is_two_files():
    """The plugins page's two files are the method tests/project/test_registry.py drops into the
    packages (tests/data/every_fourth), word for word."""
    for folder in ("schemas", "strategies"):
        documented = block(f"# {folder}/every_fourth.py").split("\n", 1)[1]
        assert documented in (TESTS / "data" / "every_fourth" / folder / "every_fourth.py").read_text()


def test_generate_command(tmp_path):
    (command,) = commands("cachekit generate flux-digits")
    result = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "x speedup, PSNR" in result.stdout and (tmp_path / "three.png").is_file()


def commands(first_line: str) -> list[str]:
    """The command lines of the bash block starting with `first_line`, comments dropped; `cachekit`
    run by this Python (`python -m cachekit`, as the README says it may be)."""
    lines = [line.split("  #")[0].strip() for line in block(first_line).splitlines()]
    python = f"{sys.executable} -m cachekit "
    return [re.sub(r"^cachekit ", python, line) for line in lines if line and not line.startswith("#")]


def test_branch_level(tmp_path):
    """The branch level's block as written: uniform computes 11 of 20 steps (every 2nd and the
    last); the second branch is computed on every 2nd of those (6) and produced on the other 14 steps."""
    output = run_python(block("# the branch level on a testbed model"), tmp_path)
    assert "branch 1 (call 2 of each step): 20 calls, 14 produced from the other branch, span 6 computed" in output
    assert "branch 0 (call 1 of each step): 20 calls, span 11 computed / 9 reused" in output


HANDLERS = {
    "import torch\nfrom diffusers import FluxPipeline": test_front_door,
    "# flux-dev.toml": test_front_door,
    "cachekit tune flux-dev.toml": test_front_door,
    "cachekit study run default --report": test_study_command,
    "cachekit generate flux-digits": test_generate_command,
    "# a config object, and the counts of one site": test_use,
    "# schemas/every_fourth.py": test_a_built_in_method_is_two_files,
    "# strategies/every_fourth.py": test_a_built_in_method_is_two_files,
    "import torch\nfrom cachekit import testbed": test_testbed,
    "# my_cache/__init__.py": test_plugin_strategy,
    "# pyproject.toml": test_plugin_strategy,
    "# cachekit_sharpness/__init__.py": test_plugin_metric_is_the_installed_test_plugin,
    "# my_dit.toml": test_declared_adapter,
    "from cachekit import declare_adapter, hookimpl": test_declared_adapter,
    "# study.toml": test_study_specs_plan,
    "# pipelines.toml": test_study_specs_plan,
    "# calibration.toml": test_study_specs_plan,
    "cachekit study run study.toml": test_study_commands,
    "cachekit calibrate calibration.toml": test_calibration_commands,
    "pip install torch": test_setup_commands_name_real_sessions,
    "pip install nox": test_setup_commands_name_real_sessions,
    "# the branch level on a testbed model": test_branch_level,
}


@pytest.mark.slow
def test_a_user_installs_the_package_into_a_fresh_environment(tmp_path):
    """The Install block, in a new virtual environment: torch first (the CPU build here), then the
    package with its pipelines extra, from this checkout; then `cachekit --version` and a study."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "torch==2.13.0"], check=True, timeout=900)
    subprocess.run([*pip, f"{ROOT}[pipelines]"], check=True, timeout=900)
    version = subprocess.run([str(venv / "bin" / "cachekit"), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("cachekit ")
    (tmp_path / "study.toml").write_text(block("# study.toml").replace("steps = 50", "steps = 4\nrepeats = 1"))
    command = [str(venv / "bin" / "cachekit"), "study", "run", "study.toml", "--db", "r.sqlite", "--quiet", "--report"]
    subprocess.run(command, cwd=tmp_path, check=True, timeout=900)
    assert (tmp_path / "r-report" / "report.md").is_file()
