"""The family registry, part skeletons and the in-process split of a loaded model."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from slm_trio.errors import ConfigError, UnsupportedArchitectureError
from slm_trio.split import gpt2, llama
from slm_trio.split._part import ModelPart, PartKind

__all__ = [
    "Family",
    "SplitModel",
    "build_part",
    "family_for",
    "part_layer_ranges",
    "split_model",
    "supported_model_types",
]


@dataclass(frozen=True, kw_only=True)
class Family:
    """One architecture family: the model types it covers and its part class."""

    name: str
    model_types: tuple[str, ...]
    part_class: type[ModelPart]


FAMILIES: tuple[Family, ...] = (
    Family(name="gpt2", model_types=gpt2.MODEL_TYPES, part_class=gpt2.GPT2Part),
    Family(name="llama", model_types=llama.MODEL_TYPES, part_class=llama.LlamaFamilyPart),
)


def supported_model_types() -> tuple[str, ...]:
    """Return the transformers ``model_type`` values that can be split, sorted."""
    return tuple(sorted(t for family in FAMILIES for t in family.model_types))


def family_for(model_type: str) -> Family:
    """Return the family that splits ``model_type``.

    Raises:
        UnsupportedArchitectureError: No family covers ``model_type``.
    """
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} has no split adapter; supported model types are "
        f"{', '.join(supported_model_types())}"
    )


def part_layer_ranges(
    layers: tuple[int, int], num_hidden_layers: int
) -> dict[PartKind, tuple[int, int]]:
    """Return the absolute layer range ``[start, stop)`` of each part for split points ``layers``.

    Raises:
        ConfigError: ``layers`` is not ``(s1, s2)`` with ``0 <= s1 <= s2 <= num_hidden_layers``.
    """
    valid = (
        isinstance(layers, tuple)
        and len(layers) == 2
        and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
    )
    if not valid or not 0 <= layers[0] <= layers[1] <= num_hidden_layers:
        raise ConfigError(
            f"layers={layers!r} is invalid for a model with {num_hidden_layers} layers; "
            f"expected (s1, s2) with 0 <= s1 <= s2 <= {num_hidden_layers}"
        )
    s1, s2 = layers
    return {"bottom": (0, s1), "trunk": (s1, s2), "top": (s2, num_hidden_layers)}


def build_part(
    config: PretrainedConfig,
    kind: PartKind,
    layer_range: tuple[int, int],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> ModelPart:
    """Build a part skeleton: parameters on the meta device, buffers on ``device``.

    The caller assigns the weights, for example with
    ``part.load_state_dict(tensors, assign=True)``. The part is in eval mode. A config whose
    attention implementation is unset gets ``"sdpa"``.

    Raises:
        UnsupportedArchitectureError: ``config.model_type`` has no split adapter.
        ConfigError: ``layer_range`` does not fit the model.
    """
    family = family_for(str(config.model_type))
    start, stop = layer_range
    total = int(config.num_hidden_layers)
    expected = {"bottom": start == 0, "trunk": True, "top": stop == total}[kind]
    if not (0 <= start <= stop <= total and expected):
        raise ConfigError(
            f"layer_range={layer_range!r} is invalid for a {kind} part of a model with "
            f"{total} layers; a bottom starts at 0, a top stops at {total}"
        )
    if getattr(config, "_attn_implementation", None) is None:
        # A config that no model has resolved yet: without an implementation, transformers
        # builds no causal mask at all. "sdpa" is what transformers picks on CPU.
        config = copy.deepcopy(config)
        config._attn_implementation = "sdpa"
    # The device context only affects this thread, so concurrent loads in other threads
    # still allocate normally.
    with torch.device("meta"):
        part = family.part_class(config, kind, layer_range)
    part._materialize(dtype, torch.device(device))
    part.eval()
    return part


@dataclass(frozen=True)
class SplitModel:
    """The three parts of one model, in forward order."""

    bottom: ModelPart
    trunk: ModelPart
    top: ModelPart


def split_model(model: nn.Module, layers: tuple[int, int]) -> SplitModel:
    """Split a loaded transformers causal LM at ``layers = (s1, s2)``.

    The parts share parameters and buffers with ``model``: no weights are copied, and
    gradients of a shared parameter accumulate in the same ``.grad``. The parts take the
    model's dtype, device and training mode.

    Raises:
        UnsupportedArchitectureError: The model's ``model_type`` has no split adapter.
        ConfigError: ``layers`` does not fit the model.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"model={type(model).__name__!r} is invalid; expected a transformers model")
    ranges = part_layer_ranges(layers, int(config.num_hidden_layers))
    parameters = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    first = next(iter(parameters.values()))

    parts: dict[PartKind, ModelPart] = {}
    for kind, layer_range in ranges.items():
        part = build_part(config, kind, layer_range, dtype=first.dtype, device=first.device)
        names = list(part.state_dict())
        missing = [name for name in names if name not in parameters]
        if missing:
            raise ValueError(
                f"model {type(model).__name__!r} has no parameters {missing!r}, which its "
                f"config ({config.model_type!r}) implies; is the model modified?"
            )
        part.load_state_dict({name: parameters[name] for name in names}, strict=True, assign=True)
        # Share the model's buffers (rotary frequencies) so both compute with the same values.
        for name, _ in list(part.named_buffers()):
            if name in buffers:
                module_name, _, buffer_name = name.rpartition(".")
                setattr(part.get_submodule(module_name), buffer_name, buffers[name])
        part.train(model.training)
        parts[kind] = part
    return SplitModel(bottom=parts["bottom"], trunk=parts["trunk"], top=parts["top"])
