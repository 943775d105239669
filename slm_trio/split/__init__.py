"""The split engine: cut a causal LM into bottom, trunk and top parts that compute what it computes.

A model of ``N`` layers is cut at ``0 <= s1 <= s2 <= N``. The bottom contains the token
embeddings and layers ``[0, s1)``, the trunk contains layers ``[s1, s2)``, and the top contains
layers ``[s2, N)``, the final norm and the LM head. Hidden states ``[batch, seq, hidden]``
travel between them.

Supported ``model_type`` values: ``gpt2``, ``llama`` (SmolLM2 included), ``mistral``, ``qwen2``.
`split_model` splits a loaded model in process; `slm_trio.loading.load_model` loads one part
alone, reading only its tensors.
"""

from __future__ import annotations

from slm_trio.split._part import ModelPart, PartCache, PartKind
from slm_trio.split._split import (
    Family,
    SplitModel,
    build_part,
    family_for,
    part_layer_ranges,
    split_model,
    supported_model_types,
)

__all__ = [
    "Family",
    "ModelPart",
    "PartCache",
    "PartKind",
    "SplitModel",
    "build_part",
    "family_for",
    "part_layer_ranges",
    "split_model",
    "supported_model_types",
]
