"""Project tasks. `nox` runs the checks CI runs: tests, lint, typecheck, docs."""

from __future__ import annotations

from pathlib import Path

import nox

ROOT = Path(__file__).parent

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.default_venv_backend = "venv"

# The CPU build; an unpinned torch would pull the multi-GB CUDA build.
TORCH = "torch==2.13.0"


def install(session: nox.Session, *extras: str) -> None:
    session.install(TORCH)
    session.install(f".[{','.join(extras)}]" if extras else ".")


# The tests and the testbed run tiny models: one thread each, as more only contend (10-25x slower on a
# busy 2-core machine). Studies choose their own count (`threads`); this also covers what they spawn.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}

# Third-party plugins, installed as a user would: an estimator that joins the conformance matrix,
# and a metric that studies compute.
PLUGINS = [str(ROOT / "tests" / "plugins" / name) for name in ("damped", "sharpness")]
# References the tests check cachekit against, without their own dependencies (their code paths
# the tests call need only torch).
REFERENCES = ["cache-dit==1.5.3"]


@nox.session
def tests(session: nox.Session) -> None:
    """The fast suite, against the installed package."""
    install(session, "test")
    session.install("--no-deps", "--no-build-isolation", *PLUGINS)
    session.install("--no-deps", *REFERENCES)
    session.run("pytest", "-m", "not slow", *session.posargs, env={"CACHEKIT_INSTALLED_TESTS": "1", **ONE_THREAD})


@nox.session
def slow(session: nox.Session) -> None:
    """Tests marked slow."""
    install(session, "test")
    session.install("--no-deps", "--no-build-isolation", *PLUGINS)
    session.install("--no-deps", *REFERENCES)
    session.run("pytest", "-m", "slow", *session.posargs, success_codes=[0, 5], env=ONE_THREAD)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy on the installed package (the source folders only form `cachekit` once installed)."""
    install(session)
    session.install("mypy", "pytest")  # cachekit.conformance is a pytest module
    config = str(ROOT / "pyproject.toml")
    session.chdir(session.create_tmp())
    session.run("mypy", "--config-file", config, "-p", "cachekit")


@nox.session
def docs(session: nox.Session) -> None:
    """The docs site from docs/ (mkdocs, material theme), built strictly: a broken link fails it.
    `nox -s docs -- serve` serves it instead."""
    session.install("mkdocs-material")
    if session.posargs[:1] == ["serve"]:
        session.run("mkdocs", "serve", *session.posargs[1:])
        return
    session.run("mkdocs", "build", "--strict", "--site-dir", str(Path(session.create_tmp()) / "site"))


@nox.session(reuse_venv=True)
def demo(session: nox.Session) -> None:
    """The main job: the default study (every built-in strategy on the trained testbed models)
    and its report, offline; a rerun reuses its environment and resumes. `nox -s demo -- --fresh`
    recomputes finished cells."""
    install(session)
    db = ROOT / "cachekit-results" / "default.sqlite"
    session.run("cachekit", "study", "run", "default", "--db", str(db), "--report", *session.posargs, env=ONE_THREAD)


@nox.session
def testbed(session: nox.Session) -> None:
    """Retrain the testbed's models and classifier into the source tree (fixed seeds; about 40
    minutes on 2 CPU cores), then record the image model's dynamics into docs/."""
    session.install(TORCH)
    session.install("-e", ".[train]")  # editable: the weights land in cachekit/testbed/weights
    session.run("python", "-m", "cachekit.testbed.train", *session.posargs)
    session.run("python", "-m", "cachekit.testbed.dynamics", "--out", str(ROOT / "docs" / "testbed-dynamics.png"))


@nox.session
def bench(session: nox.Session) -> None:
    """cachekit's cost side by side with the bare model, a hand-written TeaCache and diffusers' PAB;
    prints the ratios and writes bench-results.json."""
    install(session)
    session.run(
        "python", str(ROOT / "benchmarks" / "bench.py"), "--out", str(ROOT / "bench-results.json"), *session.posargs
    )


@nox.session
def frontier(session: nox.Session) -> None:
    """cachekit's strongest methods against diffusers' own on the trained testbed models, held out:
    the best PSNR within 10-50% of block executions, per model, at 50 and 28 steps (about 19
    minutes on 2 cores). `-- --branches`: the branch level against the step level alone on
    wan-moving-digits, at equal block executions (`benchmarks/branches.toml`, about 19 minutes)."""
    install(session)
    session.run(
        "python",
        str(ROOT / "benchmarks" / "frontier.py"),
        "--out",
        str(ROOT / "frontier-results"),
        *session.posargs,
        env=ONE_THREAD,
    )
