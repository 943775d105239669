"""AsyncModelManager with its default loader on real checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slm_trio.config import ModelConfig
from slm_trio.manager import AsyncModelManager, ModelState
from slm_trio.split import ModelPart

pytestmark = pytest.mark.anyio


async def test_loads_tiny_model_dir(tiny_model_dirs: dict[str, Path]) -> None:
    threads = torch.get_num_threads()
    config = ModelConfig(model_id="tiny", model_path=str(tiny_model_dirs["llama"]))
    async with AsyncModelManager(max_models=2) as manager:
        info = await manager.load_model(config)
        assert info.state is ModelState.READY
        async with manager.lease("tiny") as model:
            logits = await manager.run_compute(
                lambda: model(torch.tensor([[1, 2, 3]])).logits.detach()
            )
        assert logits.shape == (1, 3, 100)
    # Loading must not change process-wide torch settings.
    assert torch.get_num_threads() == threads


@pytest.mark.slow
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_loads_smollm2_trunk(smollm2_path: Path) -> None:
    config = ModelConfig(
        model_id="smollm2-trunk", model_path=str(smollm2_path), part="trunk", layers=(4, 26)
    )
    async with AsyncModelManager() as manager:
        handle = manager.start_load(config)
        assert manager.get_info("smollm2-trunk").state is ModelState.LOADING
        info = await handle.wait()
        assert info.state is ModelState.READY
        assert info.progress == 1.0
        async with manager.lease("smollm2-trunk") as part:
            assert isinstance(part, ModelPart)
            assert part.layer_range == (4, 26)
            assert part.hidden_size == 576
    assert manager.list_models_nowait() == []
