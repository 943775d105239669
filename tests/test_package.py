"""The curated public surface of the slm_trio package."""

from __future__ import annotations

import subprocess
import sys

import pytest

import slm_trio


@pytest.mark.parametrize("name", slm_trio.__all__)
def test_public_name_resolves(name: str) -> None:
    assert getattr(slm_trio, name) is not None


def test_unknown_name_raises() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        slm_trio.Nope  # noqa: B018


def test_import_stays_light() -> None:
    code = "import sys, slm_trio; print('torch' in sys.modules, 'grpclib' in sys.modules)"
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert output.split() == ["False", "False"]
