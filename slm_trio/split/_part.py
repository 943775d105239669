"""The model part and its KV cache, shared by every architecture family.

A `ModelPart` is one contiguous slice of a causal LM: the bottom (token embeddings and layers
``[0, s1)``), the trunk (layers ``[s1, s2)``) or the top (layers ``[s2, N)``, final norm and LM
head). Family modules (`gpt2`, `llama`) subclass it and fill in the embedding, layer and head
steps with transformers' own modules, so the arithmetic is the unsplit model's.

Invariants this module keeps:

- Parameter and buffer names mirror the transformers checkpoint, for example
  ``model.layers.4.self_attn.q_proj.weight``, so a part's ``state_dict()`` keys are exactly the
  checkpoint keys it needs (the tied LM head is the one exception, see `checkpoint_keys`).
- Each decoder layer is built with its absolute index, because some layers depend on it
  (GPT-2's ``scale_attn_by_inverse_layer_idx``, Qwen2's per-layer sliding window). Its
  attention module is then given the layer's local index, which addresses the part's cache.
- A forward that raises leaves the cache as it was, so a failed step can be retried.

Everything here is blocking torch code with no locks and no event-loop state; callers run it
in worker threads. Forwards on different caches may run in different threads at once, except
with the "dynamic" and "longrope" rotary types, whose rotary module rewrites its frequencies.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    DynamicCache,
    get_layer_types_and_kwargs,
)

from slm_trio.errors import ComputeInterruptedError, InvalidTensorError

__all__ = ["ModelPart", "PartCache", "PartKind"]


PartKind = Literal["bottom", "trunk", "top"]


class _LayerListCache(DynamicCache):
    """A `DynamicCache` over a fixed list of cache layers (one per layer of the part)."""

    def __init__(self, layers: list[Any]) -> None:
        # DynamicCache can only build layers for a whole model's config; a part needs a slice.
        super(DynamicCache, self).__init__(layers=layers)


class PartCache:
    """The keys and values one part's layers have cached, for incremental decoding.

    Create it with `ModelPart.new_cache` and pass it to every forward of one sequence batch;
    each forward appends its tokens in place. A part with no layers still counts tokens, so
    default positions stay right for GPT-2's position embeddings.
    """

    def __init__(self, *, model_type: str, layer_range: tuple[int, int], layers: list[Any]) -> None:
        self.model_type = model_type
        self.layer_range = layer_range
        self.kv = _LayerListCache(layers)
        self._seq_length = 0
        self._batch_size = 0

    @property
    def seq_length(self) -> int:
        """Number of cached positions per row, padding included."""
        return self._seq_length

    @property
    def batch_size(self) -> int:
        """Number of rows; 0 before the first forward."""
        return self._batch_size

    @property
    def nbytes(self) -> int:
        """Bytes of tensor storage the cached keys and values keep alive."""
        seen: set[int] = set()
        total = 0
        for layer in self.kv.layers:
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
                    continue
                # A sliding-window layer keeps a view of a larger tensor, whose whole storage
                # stays allocated.
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        return total

    def __repr__(self) -> str:
        start, stop = self.layer_range
        return (
            f"PartCache(model_type={self.model_type!r}, layers=[{start}, {stop}), "
            f"batch_size={self._batch_size}, seq_length={self._seq_length}, nbytes={self.nbytes})"
        )

    def _snapshot(self) -> list[dict[str, Any]]:
        # Dynamic cache layers rebind `keys`/`values` to new tensors on update (torch.cat), so a
        # shallow copy of each layer's attributes is enough to roll back.
        return [dict(vars(layer)) for layer in self.kv.layers]

    def _restore(self, snapshot: list[dict[str, Any]]) -> None:
        for layer, state in zip(self.kv.layers, snapshot, strict=True):
            vars(layer).clear()
            vars(layer).update(state)

    def _advance(self, batch_size: int, seq_length: int) -> None:
        self._batch_size = batch_size
        self._seq_length += seq_length


class ModelPart(nn.Module):
    """One slice of a causal LM: bottom, trunk or top.

    The bottom maps token ids ``[batch, seq]`` to hidden states ``[batch, seq, hidden]``. The
    trunk maps hidden states to hidden states, and the top maps hidden states to logits
    ``[batch, seq, vocab]``. Chained bottom -> trunk -> top, the parts compute what the whole
    model computes. Build parts with `split_model` or `slm_trio.loading.load_model`.
    """

    kind: PartKind
    model_type: str
    layer_range: tuple[int, int]
    num_hidden_layers: int
    hidden_size: int
    vocab_size: int
    config: PretrainedConfig

    #: Checkpoint key of the token embedding matrix, which a tied LM head reuses.
    embedding_key: str = ""
    #: Checkpoint key of the LM head matrix.
    head_key: str = "lm_head.weight"

    def __init__(
        self, config: PretrainedConfig, kind: PartKind, layer_range: tuple[int, int]
    ) -> None:
        super().__init__()
        self.kind = kind
        self.model_type = str(config.model_type)
        self.layer_range = layer_range
        self.num_hidden_layers = int(config.num_hidden_layers)
        self.hidden_size = int(config.hidden_size)
        self.vocab_size = int(config.vocab_size)
        self.config = config
        # A zero-size buffer follows `.to()`, so dtype and device are known even for a part
        # without parameters (an empty trunk).
        self.register_buffer("_dtype_anchor", torch.empty(0), persistent=False)

        layer_types, layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        start, stop = layer_range
        self._cache_layer_specs = list(
            zip(layer_types[start:stop], layer_kwargs[start:stop], strict=True)
        )

    # Family hooks ------------------------------------------------------------------------

    @abstractmethod
    def _embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Map token ids ``[batch, seq]`` to hidden states ``[batch, seq, hidden]`` (bottom)."""

    @abstractmethod
    def _run_layers(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        kv: DynamicCache | None,
        should_stop: Callable[[], bool] | None,
    ) -> torch.Tensor:
        """Run this part's decoder layers over ``hidden`` ``[batch, seq, hidden]``.

        Call `stop_if_requested` before each layer.
        """

    @abstractmethod
    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Map hidden states to logits ``[batch, seq, vocab]`` (top)."""

    def _reset_buffers(self, device: torch.device) -> None:
        """Recompute non-persistent buffers on ``device`` after a build on the meta device."""

    def _materialize(self, dtype: torch.dtype, device: torch.device) -> None:
        """Set the part's dtype and device and give it real buffers after a build on meta.

        Parameters stay on the meta device until weights are assigned to them.
        """
        self._dtype_anchor = torch.empty(0, dtype=dtype, device=device)
        self._reset_buffers(device)

    def _max_position(self) -> int | None:
        """Return the largest position id the part accepts, or None for no limit."""
        return None

    # Public API --------------------------------------------------------------------------

    @property
    def max_positions(self) -> int | None:
        """The model's context length (``max_position_embeddings``), or None when unknown."""
        value = getattr(self.config, "max_position_embeddings", None)
        return int(value) if value is not None else None

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the part's parameters and outputs."""
        return self._dtype_anchor.dtype

    @property
    def device(self) -> torch.device:
        """Device of the part's parameters and outputs."""
        return self._dtype_anchor.device

    @property
    def num_layers(self) -> int:
        """Number of decoder layers in this part."""
        start, stop = self.layer_range
        return stop - start

    def extra_repr(self) -> str:
        start, stop = self.layer_range
        return (
            f"kind={self.kind!r}, model_type={self.model_type!r}, layers=[{start}, {stop}) "
            f"of {self.num_hidden_layers}, dtype={self.dtype}, device={self.device}"
        )

    def checkpoint_keys(self) -> dict[str, str]:
        """Map each tensor name of this part to the checkpoint key it is loaded from.

        The names are the part's ``state_dict()`` keys. They equal the checkpoint keys, except
        that a top part of a model with tied embeddings loads its LM head from the token
        embedding matrix.
        """
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        keys = {}
        for name in self.state_dict():
            keys[name] = self.embedding_key if tied and name == self.head_key else name
        return keys

    def new_cache(self) -> PartCache:
        """Return an empty KV cache for this part's layers."""
        layers = [
            DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs) for kind, kwargs in self._cache_layer_specs
        ]
        return PartCache(model_type=self.model_type, layer_range=self.layer_range, layers=layers)

    def forward(
        self,
        inputs: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: PartCache | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Run this part over one chunk of a sequence batch.

        Args:
            inputs: Token ids ``[batch, seq]`` for the bottom, else hidden states
                ``[batch, seq, hidden]``. Hidden states of another floating dtype or device
                are converted to the part's.
            position_ids: Positions ``[batch, seq]`` (or ``[1, seq]``), non-negative integers.
                Defaults to ``past .. past + seq - 1``, where ``past`` is the cache length.
            attention_mask: ``[batch, past + seq]`` of 1 (attend) and 0 (padding), integer or
                bool, covering the cached tokens and the new ones. None means all ones.
            cache: The cache from `new_cache` for this sequence batch. The layers attend to
                the cached keys and values and append the new ones in place. Without a cache
                this is a plain full-sequence forward.
            should_stop: Called before each decoder layer, from the thread that runs the
                forward. When it returns true, the forward stops and raises
                `ComputeInterruptedError`. A server passes one so that a cancelled request
                frees its worker thread after at most one more layer.

        Returns:
            Hidden states ``[batch, seq, hidden]``, or logits ``[batch, seq, vocab]`` for the
            top, in the part's dtype.

        Raises:
            InvalidTensorError: A tensor has the wrong shape, dtype or values, or does not
                match the cache.
            ValueError: ``cache`` was made by a part with other layers.
            ComputeInterruptedError: ``should_stop`` returned true.

        The autograd graph is kept when grad is enabled; wrap inference in
        ``torch.inference_mode()``. If the forward raises, the cache is left unchanged.
        """
        batch, seq = self._check_inputs(inputs)
        past = 0
        if cache is not None:
            self._check_cache(cache, batch)
            past = cache.seq_length
        position_ids = self._check_position_ids(position_ids, batch, seq, past)
        attention_mask = self._check_attention_mask(attention_mask, batch, past + seq)

        kv = cache.kv if cache is not None else None
        snapshot = cache._snapshot() if cache is not None else None
        try:
            if self.kind == "bottom":
                hidden = self._embed(inputs.to(self.device), position_ids)
            else:
                hidden = inputs.to(device=self.device, dtype=self.dtype)
            if self.num_layers > 0:
                hidden = self._run_layers(hidden, position_ids, attention_mask, kv, should_stop)
            output = self._head(hidden) if self.kind == "top" else hidden
        except BaseException:
            if cache is not None and snapshot is not None:
                cache._restore(snapshot)
            raise
        if cache is not None:
            cache._advance(batch, seq)
        return output

    # Input checks ------------------------------------------------------------------------

    def _check_inputs(self, inputs: torch.Tensor) -> tuple[int, int]:
        if not isinstance(inputs, torch.Tensor):
            raise InvalidTensorError(
                f"{self.kind} part inputs={type(inputs).__name__!r} is invalid; expected a tensor"
            )
        shape = tuple(inputs.shape)
        if self.kind == "bottom":
            if (
                inputs.dtype.is_floating_point
                or inputs.dtype.is_complex
                or inputs.dtype == torch.bool
            ):
                raise InvalidTensorError(
                    f"bottom part inputs have dtype {inputs.dtype}; expected integer token ids"
                )
            if inputs.dim() != 2 or 0 in shape:
                raise InvalidTensorError(
                    f"bottom part inputs have shape {shape}; expected token ids [batch, seq] "
                    "with batch >= 1 and seq >= 1"
                )
            low, high = int(inputs.min()), int(inputs.max())
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                raise InvalidTensorError(
                    f"token id {bad!r} is out of range; expected 0 <= id < {self.vocab_size} "
                    "(the vocabulary size)"
                )
        else:
            if not inputs.dtype.is_floating_point:
                raise InvalidTensorError(
                    f"{self.kind} part inputs have dtype {inputs.dtype}; expected floating "
                    "hidden states"
                )
            if inputs.dim() != 3 or shape[-1] != self.hidden_size or 0 in shape:
                raise InvalidTensorError(
                    f"{self.kind} part inputs have shape {shape}; expected hidden states "
                    f"[batch, seq, {self.hidden_size}] with batch >= 1 and seq >= 1"
                )
        return shape[0], shape[1]

    def _check_cache(self, cache: PartCache, batch: int) -> None:
        if not isinstance(cache, PartCache):
            raise TypeError(f"cache={cache!r} is invalid; expected a PartCache from new_cache()")
        if cache.layer_range != self.layer_range or cache.model_type != self.model_type:
            raise ValueError(
                f"{cache!r} belongs to another part; this part is {self.model_type!r} layers "
                f"{self.layer_range}. Create caches with this part's new_cache()"
            )
        if cache.seq_length > 0 and cache.batch_size != batch:
            raise InvalidTensorError(
                f"inputs have batch size {batch} but the cache contains {cache.batch_size} rows; "
                "use one cache per sequence batch"
            )

    def _check_position_ids(
        self, position_ids: torch.Tensor | None, batch: int, seq: int, past: int
    ) -> torch.Tensor:
        if position_ids is None:
            # [batch, seq]
            position_ids = torch.arange(past, past + seq, device=self.device, dtype=torch.long)
            position_ids = position_ids.unsqueeze(0).expand(batch, -1)
            low, high = past, past + seq - 1
        else:
            if not isinstance(position_ids, torch.Tensor):
                raise InvalidTensorError(
                    f"position_ids={type(position_ids).__name__!r} is invalid; expected a tensor"
                )
            if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
                raise InvalidTensorError(
                    f"position_ids have dtype {position_ids.dtype}; expected integers"
                )
            shape = tuple(position_ids.shape)
            if shape not in ((batch, seq), (1, seq)):
                raise InvalidTensorError(
                    f"position_ids have shape {shape}; expected [{batch}, {seq}] (batch, seq)"
                )
            # [batch, seq]
            position_ids = position_ids.to(device=self.device, dtype=torch.long).expand(batch, -1)
            low, high = int(position_ids.min()), int(position_ids.max())

        limit = self._max_position()
        if low < 0 or (limit is not None and high > limit):
            bad = low if low < 0 else high
            upper = f" <= {limit} (max_position_embeddings - 1)" if limit is not None else ""
            raise InvalidTensorError(
                f"position id {bad!r} is out of range; expected 0 <= position{upper}"
            )
        return position_ids

    def _check_attention_mask(
        self, attention_mask: torch.Tensor | None, batch: int, total: int
    ) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor):
            raise InvalidTensorError(
                f"attention_mask={type(attention_mask).__name__!r} is invalid; expected a tensor"
            )
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise InvalidTensorError(
                f"attention_mask has dtype {attention_mask.dtype}; expected integers or bool"
            )
        shape = tuple(attention_mask.shape)
        if shape != (batch, total):
            raise InvalidTensorError(
                f"attention_mask has shape {shape}; expected [{batch}, {total}] "
                "(batch, cached + new tokens)"
            )
        attention_mask = attention_mask.to(self.device)
        if attention_mask.dtype != torch.bool and not bool(
            ((attention_mask == 0) | (attention_mask == 1)).all()
        ):
            raise InvalidTensorError("attention_mask has values other than 0 and 1")
        return attention_mask


def stop_if_requested(should_stop: Callable[[], bool] | None) -> None:
    """Raise `ComputeInterruptedError` when ``should_stop`` is given and returns true."""
    if should_stop is not None and should_stop():
        raise ComputeInterruptedError("the forward pass stopped because its request was cancelled")
