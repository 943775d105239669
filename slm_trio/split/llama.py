"""Split adapter for the Llama family: ``llama`` (SmolLM2 included), ``mistral`` and ``qwen2``.

The part reuses transformers' decoder layer, RMS norm and rotary embedding classes of each model
type, and builds masks with transformers' mask functions, so its output equals the unsplit
model's. Every part with layers owns a rotary module and computes cos/sin from the explicit
``position_ids``; nothing about positions travels between parts.

Attention types follow each model's own rule: Llama layers are all full attention, Mistral
layers all use a sliding window when ``config.sliding_window`` is set, and Qwen2 reads
``config.layer_types`` per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.models.mistral.modeling_mistral import (
    MistralDecoderLayer,
    MistralRMSNorm,
    MistralRotaryEmbedding,
)
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
)

from slm_trio.errors import UnsupportedArchitectureError
from slm_trio.split._part import ModelPart, PartKind, stop_if_requested

__all__ = ["MODEL_TYPES", "LlamaFamilyPart"]

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


def _llama_attention_type(config: PretrainedConfig, index: int) -> str:
    return FULL_ATTENTION


def _mistral_attention_type(config: PretrainedConfig, index: int) -> str:
    return FULL_ATTENTION if config.sliding_window is None else SLIDING_ATTENTION


def _qwen2_attention_type(config: PretrainedConfig, index: int) -> str:
    return str(config.layer_types[index])


@dataclass(frozen=True)
class _ModelClasses:
    decoder_layer: type[nn.Module]
    norm: type[nn.Module]
    rotary: type[nn.Module]
    attention_type: Callable[[PretrainedConfig, int], str]


_CLASSES = {
    "llama": _ModelClasses(
        LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding, _llama_attention_type
    ),
    "mistral": _ModelClasses(
        MistralDecoderLayer, MistralRMSNorm, MistralRotaryEmbedding, _mistral_attention_type
    ),
    "qwen2": _ModelClasses(
        Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding, _qwen2_attention_type
    ),
}

MODEL_TYPES: tuple[str, ...] = tuple(_CLASSES)


class _LlamaBody(nn.Module):
    """The part's slice of ``LlamaModel``, with the same attribute names."""

    embed_tokens: nn.Embedding | None
    norm: nn.Module | None
    rotary_emb: nn.Module | None

    def __init__(
        self,
        config: PretrainedConfig,
        kind: PartKind,
        layer_range: tuple[int, int],
        classes: _ModelClasses,
    ) -> None:
        super().__init__()
        start, stop = layer_range
        if kind == "bottom":
            self.embed_tokens = nn.Embedding(
                config.vocab_size, config.hidden_size, config.pad_token_id
            )
        else:
            self.embed_tokens = None
        # Keys are absolute layer indices, as in the checkpoint (model.layers.<i>.*).
        self.layers = nn.ModuleDict(
            {str(i): classes.decoder_layer(config, i) for i in range(start, stop)}
        )
        if kind == "top":
            self.norm = classes.norm(config.hidden_size, eps=config.rms_norm_eps)
        else:
            self.norm = None
        self.rotary_emb = classes.rotary(config) if stop > start else None


class LlamaFamilyPart(ModelPart):
    """A bottom, trunk or top part of a Llama, Mistral or Qwen2 causal LM."""

    embedding_key = "model.embed_tokens.weight"
    lm_head: nn.Linear | None

    def __init__(
        self, config: PretrainedConfig, kind: PartKind, layer_range: tuple[int, int]
    ) -> None:
        super().__init__(config, kind, layer_range)
        self._classes = _CLASSES[self.model_type]
        self.model = _LlamaBody(config, kind, layer_range, self._classes)
        if kind == "top":
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        else:
            self.lm_head = None

        start, stop = layer_range
        for local_index, layer in enumerate(self.model.layers.values()):
            # The attention module addresses the cache by layer_idx; the part's cache holds
            # only this part's layers.
            attention: Any = layer.get_submodule("self_attn")
            attention.layer_idx = local_index
        self._attention_types = [
            self._classes.attention_type(config, i) for i in range(start, stop)
        ]
        unknown = sorted(set(self._attention_types) - {FULL_ATTENTION, SLIDING_ATTENTION})
        if unknown:
            raise UnsupportedArchitectureError(
                f"{self.model_type!r} layer types {unknown!r} are not supported; supported "
                f"types are {FULL_ATTENTION!r} and {SLIDING_ATTENTION!r}"
            )

    def _reset_buffers(self, device: torch.device) -> None:
        if self.model.rotary_emb is not None:
            with torch.device(device):
                self.model.rotary_emb = self._classes.rotary(self.config)

    def _embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if self.model.embed_tokens is None:
            raise RuntimeError(f"{self.kind} part has no token embeddings")
        hidden: torch.Tensor = self.model.embed_tokens(input_ids)  # [batch, seq, hidden]
        return hidden

    def _run_layers(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        kv: DynamicCache | None,
        should_stop: Callable[[], bool] | None,
    ) -> torch.Tensor:
        if self.model.rotary_emb is None:
            raise RuntimeError(f"{self.kind} part has layers but no rotary embedding")
        # (cos, sin), each [batch, seq, head_dim]
        position_embeddings = self.model.rotary_emb(hidden, position_ids)

        # The mask functions size the mask from the cache, so they run before any layer
        # appends to it. Masks are 4-D, or None where SDPA's is_causal covers the case.
        mask_arguments = {
            "config": self.config,
            "inputs_embeds": hidden,
            "attention_mask": attention_mask,
            "cache": kv,
            "position_ids": position_ids,
        }
        masks: dict[str, torch.Tensor | None] = {}
        if FULL_ATTENTION in self._attention_types:
            masks[FULL_ATTENTION] = create_causal_mask(**mask_arguments)
        if SLIDING_ATTENTION in self._attention_types:
            masks[SLIDING_ATTENTION] = create_sliding_window_causal_mask(**mask_arguments)

        for layer, attention_type in zip(
            self.model.layers.values(), self._attention_types, strict=True
        ):
            stop_if_requested(should_stop)
            # [batch, seq, hidden]
            hidden = layer(
                hidden,
                attention_mask=masks[attention_type],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=kv,
                use_cache=kv is not None,
            )
        return hidden

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.model.norm is None or self.lm_head is None:
            raise RuntimeError(f"{self.kind} part has no final norm and LM head")
        hidden = self.model.norm(hidden)
        logits: torch.Tensor = self.lm_head(hidden)  # [batch, seq, vocab]
        return logits
