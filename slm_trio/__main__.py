"""Run the ``slm-trio`` command line as ``python -m slm_trio``."""

from slm_trio.cli import run

run()
