"""Split adapter for GPT-2 (``gpt2``).

The part reuses transformers' `GPT2Block` and builds the causal mask with transformers' mask
function, so its output equals the unsplit model's. GPT-2 adds learned position embeddings
(``wpe``) to the token embeddings in the bottom, which reads them at the explicit
``position_ids``. The other parts pass positions only to the mask function, which uses them to
detect packed sequences.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from slm_trio.errors import UnsupportedArchitectureError
from slm_trio.split._part import ModelPart, PartKind, stop_if_requested

__all__ = ["MODEL_TYPES", "GPT2Part"]

MODEL_TYPES: tuple[str, ...] = ("gpt2",)


class _GPT2Body(nn.Module):
    """The part's slice of ``GPT2Model``, with the same attribute names."""

    wte: nn.Embedding | None
    wpe: nn.Embedding | None
    drop: nn.Dropout | None
    ln_f: nn.LayerNorm | None

    def __init__(
        self, config: PretrainedConfig, kind: PartKind, layer_range: tuple[int, int]
    ) -> None:
        super().__init__()
        start, stop = layer_range
        if kind == "bottom":
            self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
            self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
            self.drop = nn.Dropout(config.embd_pdrop)
        else:
            self.wte = self.wpe = self.drop = None
        # Keys are absolute layer indices, as in the checkpoint (transformer.h.<i>.*).
        self.h = nn.ModuleDict(
            {
                str(i): GPT2Block(config, layer_idx=i)  # type: ignore[no-untyped-call]
                for i in range(start, stop)
            }
        )
        if kind == "top":
            self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        else:
            self.ln_f = None


class GPT2Part(ModelPart):
    """A bottom, trunk or top part of a GPT-2 causal LM."""

    embedding_key = "transformer.wte.weight"
    lm_head: nn.Linear | None

    def __init__(
        self, config: PretrainedConfig, kind: PartKind, layer_range: tuple[int, int]
    ) -> None:
        if getattr(config, "add_cross_attention", False):
            raise UnsupportedArchitectureError(
                "GPT-2 with add_cross_attention=True is not supported; split engines handle "
                "decoder-only models. Use a config with add_cross_attention=False"
            )
        super().__init__(config, kind, layer_range)
        self.transformer = _GPT2Body(config, kind, layer_range)
        if kind == "top":
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        else:
            self.lm_head = None
        for local_index, block in enumerate(self.transformer.h.values()):
            # The layer was built with its absolute index, which fixes its attention scaling
            # (scale_attn_by_inverse_layer_idx). The local index addresses the part's cache.
            attention: Any = block.get_submodule("attn")
            attention.layer_idx = local_index

    def _max_position(self) -> int | None:
        if self.kind != "bottom":
            return None
        return int(self.config.max_position_embeddings) - 1

    def _embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        body = self.transformer
        if body.wte is None or body.wpe is None or body.drop is None:
            raise RuntimeError(f"{self.kind} part has no token embeddings")
        hidden = body.wte(input_ids) + body.wpe(position_ids)
        output: torch.Tensor = body.drop(hidden)  # [batch, seq, hidden]
        return output

    def _run_layers(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        kv: DynamicCache | None,
        should_stop: Callable[[], bool] | None,
    ) -> torch.Tensor:
        # Built before any block appends to the cache, which sizes the mask.
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            cache=kv,
            position_ids=position_ids,
        )
        for block in self.transformer.h.values():
            stop_if_requested(should_stop)
            # [batch, seq, hidden]
            hidden = block(
                hidden,
                cache=kv,
                attention_mask=mask,
                use_cache=kv is not None,
                position_ids=position_ids,
            )
        return hidden

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.transformer.ln_f is None or self.lm_head is None:
            raise RuntimeError(f"{self.kind} part has no final norm and LM head")
        hidden = self.transformer.ln_f(hidden)
        logits: torch.Tensor = self.lm_head(hidden)  # [batch, seq, vocab]
        return logits
