"""Load a whole model or one part of it, reading only the tensors that part needs.

`load_model` is blocking; the model manager runs it in a worker thread. It never changes
process-wide torch settings (default dtype, thread count), so loads in several threads do not
disturb each other. For that reason it does not call transformers' ``from_pretrained``, which
sets the process-wide default dtype while it builds a model (transformers 5.25).

Every load follows the same steps:

1. Read the architecture config (``config.json``, or the GGUF metadata) and check it against
   the `ModelConfig`: expected ``model_type``, split points, supported family.
2. Build the module skeleton on the meta device, so no parameter memory is allocated: the
   whole model for ``part="full"``, else one `ModelPart`. A meta skeleton of the whole model
   also provides the list of tensor names the checkpoint may contain.
3. Open the checkpoint and check its tensor names: every tensor the target needs must be
   present, and every tensor in the file must belong to the model. Both failures raise
   `CheckpointError` listing the names, so nothing is ever left randomly initialised.
4. Read the needed tensors one by one (safetensors through ``safe_open``, GGUF by
   dequantising only the selected tensors), convert them to the requested dtype and device,
   report progress after each, and assign them to the skeleton.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
import re
import struct
import time
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch
from gguf import MODEL_ARCH_NAMES, GGUFReader, dequantize, get_tensor_name_map
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    TensorProcessor,
    read_field,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from slm_trio.config import ModelConfig
from slm_trio.errors import CheckpointError, ConfigError
from slm_trio.split import ModelPart, build_part, family_for, part_layer_ranges

__all__ = ["load_model", "load_tokenizer"]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[float], None]

_STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
# GGUF tensors that transformers recomputes from the config instead of loading (Llama 3 rotary
# scaling factors); a file may contain them without their being unexpected.
_GGUF_IGNORED_TENSORS = frozenset({"rope_freqs.weight"})
# How many names an error message lists before it only gives the count.
_MAX_LISTED_NAMES = 20


def load_model(config: ModelConfig, progress: ProgressCallback | None = None) -> nn.Module:
    """Load the model or model part that ``config`` describes.

    ``part="full"`` returns the whole transformers causal LM (for example `LlamaForCausalLM`);
    ``"bottom"``, ``"trunk"`` and ``"top"`` return a `slm_trio.split.ModelPart` containing
    only that part's weights. The result is in eval mode, on ``config.device``, in
    ``config.dtype`` (``"auto"`` is the checkpoint's dtype, float32 for GGUF).

    Args:
        config: What to load. ``model_format="auto"`` picks the format from the path: a
            directory is a Hugging Face model directory, ``.gguf`` a GGUF file, and ``.pt``,
            ``.pth``, ``.bin`` or ``.safetensors`` a state-dict file described by
            ``config_path`` (default: the ``config.json`` beside it).
        progress: Called with the loaded fraction (0.0 to 1.0) before the first tensor and
            after each one. An exception it raises stops the load and propagates unchanged,
            which is how a caller cancels a load.

    Raises:
        ConfigError: The path does not exist, the format or device is invalid, ``layers``
            does not fit the model, or ``model_type`` does not match the checkpoint.
        UnsupportedArchitectureError: The checkpoint's ``model_type`` has no split adapter.
        CheckpointError: The checkpoint cannot be read, is a pickled object, or misses or
            adds tensors.
    """
    report = progress if progress is not None else _ignore_progress
    started = time.monotonic()
    path = Path(config.model_path)
    model_format = _resolve_format(config, path)
    hf_config = _read_hf_config(config, path, model_format)
    _check_model_type(config, hf_config)
    family = family_for(str(hf_config.model_type))
    num_layers = int(hf_config.num_hidden_layers)
    if config.layers is not None:
        ranges = part_layer_ranges(config.layers, num_layers)
    elif config.part != "full":
        raise ConfigError(f"layers is missing for part={config.part!r}")
    device = _resolve_device(config.device)
    hf_config = copy.deepcopy(hf_config)
    hf_config._attn_implementation = config.attn_implementation

    whole = _build_whole_skeleton(hf_config)
    with _open_checkpoint(model_format, path, hf_config, whole) as source:
        dtype = _resolve_dtype(config.dtype, model_format, hf_config, source)
        target: nn.Module
        if config.part == "full":
            target = whole
            keys = _whole_checkpoint_keys(whole, hf_config, family.part_class)
        else:
            part = build_part(
                hf_config, config.part, ranges[config.part], dtype=dtype, device=device
            )
            target = part
            keys = part.checkpoint_keys()
        _check_names(source, expected=set(whole.state_dict()), needed=set(keys.values()))
        loaded_bytes = _assign_tensors(
            target, keys, source, dtype=dtype, device=device, report=report
        )

    if config.part == "full":
        _finish_whole_model(whole, device)
        _load_generation_config(whole, config, path, model_format)
    target.eval()
    logger.info(
        "model.load.done model_id=%s part=%s format=%s layers=%s tensors=%d bytes=%d "
        "dtype=%s device=%s seconds=%.2f",
        config.model_id,
        config.part,
        model_format,
        config.layers,
        len(keys),
        loaded_bytes,
        dtype,
        device,
        time.monotonic() - started,
    )
    return target


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    """Load the tokenizer that belongs to ``config``'s checkpoint.

    A Hugging Face directory and a GGUF file carry their own tokenizer. For a state-dict
    file the tokenizer files must be in ``config_path`` or beside the checkpoint.

    Raises:
        ConfigError: The path does not exist or the format is invalid.
        CheckpointError: No tokenizer could be read from the checkpoint.
    """
    path = Path(config.model_path)
    model_format = _resolve_format(config, path)
    if model_format == "gguf":
        source, kwargs = str(path.parent), {"gguf_file": path.name}
    elif model_format == "hf":
        source, kwargs = str(path), {}
    else:
        config_dir = Path(config.config_path) if config.config_path else path.parent
        source = str(config_dir if config_dir.is_dir() else config_dir.parent)
        kwargs = {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"no tokenizer could be read for model_path={config.model_path!r} from "
            f"{source!r}: {exc}. Put the tokenizer files beside the checkpoint"
        ) from exc
    return tokenizer


def _ignore_progress(fraction: float) -> None:
    pass


# Config, format, dtype and device ---------------------------------------------------------


def _resolve_format(config: ModelConfig, path: Path) -> str:
    if not path.exists():
        raise ConfigError(
            f"model_path={config.model_path!r} does not exist; give an existing model "
            "directory, .gguf file or state-dict file"
        )
    if config.model_format != "auto":
        return config.model_format
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return "gguf"
    if suffix in _STATE_DICT_SUFFIXES:
        return "state_dict"
    raise ConfigError(
        f"model_path={config.model_path!r} has an unknown suffix {suffix!r}; use a model "
        f"directory, a .gguf file or one of {', '.join(_STATE_DICT_SUFFIXES)}, or set "
        "model_format explicitly"
    )


def _read_hf_config(config: ModelConfig, path: Path, model_format: str) -> PretrainedConfig:
    if model_format == "gguf":
        if not path.is_file():
            raise ConfigError(f"model_path={config.model_path!r} is not a GGUF file")
        where = str(path)
        try:
            hf_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        except struct.error as exc:
            # The gguf reader unpacks fields past the end of a truncated file.
            raise CheckpointError(
                f"GGUF file {where!r} ({path.stat().st_size} bytes) ends in the middle of "
                f"its metadata, so it is truncated or corrupt: {exc}. Copy the file again"
            ) from exc
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"GGUF metadata of {where!r} could not be read: {exc}") from exc
        return hf_config  # type: ignore[no-any-return]

    if config.config_path is not None:
        config_location = Path(config.config_path)
    else:
        config_location = path if path.is_dir() else path.parent
    config_file = config_location / "config.json" if config_location.is_dir() else config_location
    if not config_file.is_file():
        raise ConfigError(
            f"model config {str(config_file)!r} does not exist; set config_path to the "
            "directory or config.json that describes the checkpoint"
        )
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
        model_type = data.pop("model_type")
        hf_config = AutoConfig.for_model(model_type, **data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"model config {str(config_file)!r} could not be read: {exc!r}"
        ) from exc
    return hf_config


def _check_model_type(config: ModelConfig, hf_config: PretrainedConfig) -> None:
    if config.model_type is not None and config.model_type != hf_config.model_type:
        raise ConfigError(
            f"model_type={config.model_type!r} does not match the checkpoint, whose model_type "
            f"is {hf_config.model_type!r}; fix model_type or model_path"
        )


def _resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} is not available on this machine; use 'cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name!r} is not available on this machine; use 'cpu'")
    return device


def _resolve_dtype(
    name: str, model_format: str, hf_config: PretrainedConfig, source: _TensorSource
) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if model_format == "gguf":
        return torch.float32
    declared = getattr(hf_config, "dtype", None)
    if isinstance(declared, str):
        declared = _DTYPES.get(declared)
    if isinstance(declared, torch.dtype) and declared.is_floating_point:
        return declared
    return source.floating_dtype() or torch.float32


# Skeletons ---------------------------------------------------------------------------------


def _build_whole_skeleton(hf_config: PretrainedConfig) -> nn.Module:
    model_class: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
    # The meta device context only affects this thread.
    with torch.device("meta"):
        model: nn.Module = model_class(hf_config)
    return model


def _whole_checkpoint_keys(
    whole: nn.Module, hf_config: PretrainedConfig, part_class: type[ModelPart]
) -> dict[str, str]:
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    keys = {}
    for name in whole.state_dict():
        keys[name] = part_class.embedding_key if tied and name == part_class.head_key else name
    return keys


def _finish_whole_model(model: nn.Module, device: torch.device) -> None:
    tie_weights = getattr(model, "tie_weights", None)
    if callable(tie_weights):
        tie_weights()
    # Non-persistent buffers (rotary frequencies) are not in checkpoints. The modules that own
    # them keep their config, so they are rebuilt on the target device.
    for module_name, module in list(model.named_modules()):
        if not any(buffer.is_meta for buffer in module.buffers(recurse=False)):
            continue
        module_config = getattr(module, "config", None)
        if module_config is None or not module_name:
            raise CheckpointError(f"buffers of module {module_name!r} could not be initialised")
        with torch.device(device):
            rebuilt = type(module)(module_config)
        parent_name, _, child_name = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, rebuilt)
    leftover = [name for name, tensor in model.state_dict(keep_vars=True).items() if tensor.is_meta]
    if leftover:
        raise CheckpointError(f"tensors {_format_names(leftover)} were not loaded")


def _load_generation_config(model: Any, config: ModelConfig, path: Path, model_format: str) -> None:
    """Use the checkpoint's ``generation_config.json`` (EOS tokens, defaults), if it has one."""
    if model_format == "gguf":
        return
    if config.config_path is not None:
        directory = Path(config.config_path)
    else:
        directory = path if path.is_dir() else path.parent
    if not directory.is_dir():
        directory = directory.parent
    if not (directory / "generation_config.json").is_file():
        return
    try:
        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"generation config in {str(directory)!r} could not be read: {exc}"
        ) from exc


# Checkpoint readers ------------------------------------------------------------------------


class _TensorSource(ABC):
    """Tensors of one checkpoint, read one at a time by their transformers name."""

    def __init__(self, description: str, file_names: dict[str, str]) -> None:
        self.description = description
        # transformers name -> name in the file
        self.file_names = file_names
        # Names in the file that belong to no parameter but may be present (legacy buffers).
        self.ignored: set[str] = set()

    def names(self) -> set[str]:
        """Return the transformers names of the tensors the checkpoint contains."""
        return set(self.file_names)

    def read(self, name: str) -> torch.Tensor:
        """Read the tensor called ``name`` into CPU memory."""
        return self._read_file_tensor(self.file_names[name])

    @abstractmethod
    def _read_file_tensor(self, file_name: str) -> torch.Tensor: ...

    def floating_dtype(self) -> torch.dtype | None:
        """Return the dtype of the checkpoint's first floating tensor, if any."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Release open files."""

    def accept_base_model_names(self, whole: nn.Module) -> None:
        """Map names saved from the base model (``h.0.*`` for ``transformer.h.0.*``).

        Also marks the names the model class declares as ignorable (GPT-2's legacy
        ``attn.bias`` mask buffers).
        """
        prefix = str(getattr(whole, "base_model_prefix", "") or "")
        expected = set(whole.state_dict())
        renamed = {}
        for name, file_name in self.file_names.items():
            if prefix and name not in expected and f"{prefix}.{name}" in expected:
                name = f"{prefix}.{name}"
            renamed[name] = file_name
        self.file_names = renamed
        patterns = getattr(whole, "_keys_to_ignore_on_load_unexpected", None) or []
        self.ignored = {name for name in renamed if _matches(patterns, name)}


class _SafetensorsSource(_TensorSource):
    """Safetensors files, read tensor by tensor through memory-mapped ``safe_open`` handles."""

    def __init__(self, description: str, files: list[Path]) -> None:
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        self._file_of: dict[str, Path] = {}
        try:
            for file in files:
                handle = self._stack.enter_context(
                    safe_open(str(file), framework="pt", device="cpu")
                )
                for file_name in handle.keys():
                    self._handles[file_name] = handle
        except (OSError, safetensors.SafetensorError) as exc:
            self._stack.close()
            raise CheckpointError(f"checkpoint {description} could not be read: {exc}") from exc
        super().__init__(description, {name: name for name in self._handles})

    def _read_file_tensor(self, file_name: str) -> torch.Tensor:
        tensor: torch.Tensor = self._handles[file_name].get_tensor(file_name)
        return tensor

    def floating_dtype(self) -> torch.dtype | None:
        for file_name, handle in self._handles.items():
            dtype = _SAFETENSORS_DTYPES.get(handle.get_slice(file_name).get_dtype())
            if dtype is not None:
                return dtype
        return None

    def close(self) -> None:
        self._stack.close()


class _TorchFileSource(_TensorSource):
    """State-dict files written by ``torch.save``, read with ``weights_only=True``.

    Shards are loaded one at a time (memory-mapped when in torch's zip format).
    """

    def __init__(self, description: str, files: list[Path]) -> None:
        self._file_of: dict[str, Path] = {}
        self._loaded_file: Path | None = None
        self._loaded: dict[str, torch.Tensor] = {}
        for file in files:
            for file_name in self._load(file):
                self._file_of[file_name] = file
        super().__init__(description, {name: name for name in self._file_of})

    def _load(self, file: Path) -> dict[str, torch.Tensor]:
        if self._loaded_file != file:
            self._loaded = {}
            self._loaded = _torch_load_state_dict(file)
            self._loaded_file = file
        return self._loaded

    def _read_file_tensor(self, file_name: str) -> torch.Tensor:
        return self._load(self._file_of[file_name])[file_name]

    def floating_dtype(self) -> torch.dtype | None:
        for file_name, file in self._file_of.items():
            dtype = self._load(file)[file_name].dtype
            if dtype.is_floating_point:
                return dtype
        return None

    def close(self) -> None:
        self._loaded = {}
        self._loaded_file = None


def _torch_load_state_dict(file: Path) -> dict[str, torch.Tensor]:
    # Only files in torch's zip format can be memory-mapped; legacy files load whole.
    mmap = zipfile.is_zipfile(file)
    try:
        data = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {str(file)!r} is a pickled object, not a state dict: torch.load with "
            "weights_only=True rejects arbitrary pickles because unpickling can run code. "
            "Save model.state_dict() instead of the model"
        ) from exc
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"checkpoint {str(file)!r} could not be read: {exc}") from exc
    if not isinstance(data, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in data.items()
    ):
        raise CheckpointError(
            f"checkpoint {str(file)!r} contains a {type(data).__name__}, not a state dict "
            "mapping names to tensors; save model.state_dict()"
        )
    return data


class _GGUFSource(_TensorSource):
    """Tensors of a GGUF file, dequantised one at a time.

    The GGUF reader memory-maps the file, so tensors that are never read are never copied
    into memory.
    """

    def __init__(self, path: Path, hf_config: PretrainedConfig, whole: nn.Module) -> None:
        try:
            self._reader = GGUFReader(str(path))
        except (OSError, ValueError, struct.error) as exc:
            raise CheckpointError(f"GGUF file {str(path)!r} could not be read: {exc}") from exc
        fields: Any = read_field(self._reader, "general.architecture")  # type: ignore[no-untyped-call]
        architecture = str(fields[0])
        # The parsed metadata (mostly the tokenizer vocabulary) takes about 150 MiB for SmolLM2.
        # The tensors do not refer to it, so it can go once the config is read.
        self._reader.fields.clear()
        # The processor undoes llama.cpp's weight layout, such as the Q/K row permutation of
        # Llama attention and GPT-2's transposed matrices.
        processor_class: Any = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
        self._processor: Any = processor_class(config=hf_config.to_dict())
        # GGUF name -> transformers name
        self._name_map = _gguf_names(whole, architecture, int(hf_config.num_hidden_layers))
        self._tensors: dict[str, Any] = {}
        self.unmapped: list[str] = []
        file_names = {}
        for tensor in self._reader.tensors:
            hf_name = self._name_map.get(tensor.name)
            if hf_name is not None:
                self._tensors[tensor.name] = tensor
                file_names[hf_name] = tensor.name
            elif tensor.name not in _GGUF_IGNORED_TENSORS:
                self.unmapped.append(tensor.name)
        super().__init__(repr(str(path)), file_names)

    def accept_base_model_names(self, whole: nn.Module) -> None:
        # GGUF names were already mapped to transformers names.
        return

    def close(self) -> None:
        # The reader memory-maps the file; dropping the references unmaps it.
        self._tensors = {}

    def _read_file_tensor(self, file_name: str) -> torch.Tensor:
        tensor = self._tensors[file_name]
        weights = dequantize(tensor.data, tensor.tensor_type)
        parsed: dict[str, dict[str, torch.Tensor]] = {"tensors": {}}
        result = self._processor.process(
            weights=weights,
            name=file_name,
            tensor_key_mapping=self._name_map,
            parsed_parameters=parsed,
        )
        if result.name is None:
            # The GPT-2 processor stores the LM head in `parsed` itself and returns no name.
            # NOTE: no test covers a GPT-2 GGUF file.
            return next(iter(parsed["tensors"].values()))
        return torch.from_numpy(np.copy(result.weights))


def _gguf_names(whole: nn.Module, architecture: str, num_layers: int) -> dict[str, str]:
    """Map the GGUF tensor names of ``architecture`` to the whole model's tensor names.

    The gguf package's name table lists transformers module paths. A full path is tried
    first, then paths without their leading modules, for checkpoints converted from the base
    model. This builds the table once, where transformers' `get_gguf_hf_weights_map` builds it
    once per submodule (measured: about 6 s of a 12 s SmolLM2 trunk load on 2 CPU cores).
    """
    arch = next((key for key, name in MODEL_ARCH_NAMES.items() if name == architecture), None)
    if arch is None:
        raise CheckpointError(
            f"GGUF architecture {architecture!r} is unknown to the installed gguf package"
        )
    table = get_tensor_name_map(arch, num_layers)
    names: dict[str, str] = {}
    hf_names = list(whole.state_dict())
    for strip in (False, True):
        for hf_name in hf_names:
            module_path, _, suffix = hf_name.rpartition(".")
            if suffix not in ("weight", "bias"):
                module_path, suffix = hf_name, ""
            components = module_path.split(".")
            starts = range(1, len(components)) if strip else range(1)
            for start in starts:
                gguf_base = table.get_name(".".join(components[start:]))
                if gguf_base is not None:
                    gguf_name = f"{gguf_base}.{suffix}" if suffix else gguf_base
                    names.setdefault(gguf_name, hf_name)
                    break
    return names


@contextmanager
def _open_checkpoint(
    model_format: str, path: Path, hf_config: PretrainedConfig, whole: nn.Module
) -> Iterator[_TensorSource]:
    source: _TensorSource
    if model_format == "gguf":
        source = _GGUFSource(path, hf_config, whole)
    elif model_format == "hf":
        source = _open_hf_directory(path)
    elif path.suffix.lower() == ".safetensors":
        source = _SafetensorsSource(repr(str(path)), [path])
    else:
        source = _TorchFileSource(repr(str(path)), [path])
    try:
        source.accept_base_model_names(whole)
        yield source
    finally:
        source.close()


def _open_hf_directory(path: Path) -> _TensorSource:
    if not path.is_dir():
        raise ConfigError(f"model_path={str(path)!r} is not a model directory")
    description = repr(str(path))
    safetensors_index = path / "model.safetensors.index.json"
    if safetensors_index.is_file():
        return _SafetensorsSource(description, _shard_files(safetensors_index))
    if (path / "model.safetensors").is_file():
        return _SafetensorsSource(description, [path / "model.safetensors"])
    torch_index = path / "pytorch_model.bin.index.json"
    if torch_index.is_file():
        return _TorchFileSource(description, _shard_files(torch_index))
    if (path / "pytorch_model.bin").is_file():
        return _TorchFileSource(description, [path / "pytorch_model.bin"])
    raise CheckpointError(
        f"model directory {description} contains no weights; expected model.safetensors, "
        "a model.safetensors.index.json with its shards, or pytorch_model.bin"
    )


def _shard_files(index_file: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"shard index {str(index_file)!r} could not be read: {exc!r}"
        ) from exc
    files = [index_file.parent / name for name in sorted(set(weight_map.values()))]
    missing = [str(file) for file in files if not file.is_file()]
    if missing:
        raise CheckpointError(
            f"shard index {str(index_file)!r} names missing files {_format_names(missing)}"
        )
    return files


def _matches(patterns: list[str] | set[str], name: str) -> bool:
    return any(re.search(pattern, name) for pattern in patterns)


# Name checks and assignment -----------------------------------------------------------------


def _format_names(names: list[str]) -> str:
    listed = ", ".join(repr(name) for name in names[:_MAX_LISTED_NAMES])
    if len(names) > _MAX_LISTED_NAMES:
        listed += f" and {len(names) - _MAX_LISTED_NAMES} more"
    return listed


def _check_names(source: _TensorSource, *, expected: set[str], needed: set[str]) -> None:
    available = source.names()
    unexpected = sorted(available - expected - source.ignored)
    if isinstance(source, _GGUFSource):
        unexpected = sorted(set(unexpected) | set(source.unmapped))
    if unexpected:
        raise CheckpointError(
            f"checkpoint {source.description} contains {len(unexpected)} unexpected tensor(s) "
            f"{_format_names(unexpected)} that the model config does not describe; check that "
            "config_path and model_type match the checkpoint"
        )
    missing = sorted(needed - available)
    if missing:
        raise CheckpointError(
            f"checkpoint {source.description} is missing {len(missing)} tensor(s) "
            f"{_format_names(missing)}; the checkpoint is incomplete or belongs to another "
            "model"
        )


def _assign_tensors(
    target: nn.Module,
    keys: dict[str, str],
    source: _TensorSource,
    *,
    dtype: torch.dtype,
    device: torch.device,
    report: ProgressCallback,
) -> int:
    """Read each needed tensor, convert it, and assign all of them to ``target``.

    Returns the number of bytes assigned.
    """
    skeleton = target.state_dict(keep_vars=True)
    tensors: dict[str, torch.Tensor] = {}
    # A tied LM head and the embedding share one checkpoint tensor; read it once.
    converted: dict[str, torch.Tensor] = {}
    total = len(keys)
    report(0.0)
    for index, (name, key) in enumerate(keys.items()):
        if key not in converted:
            try:
                tensor = source.read(key)
            except (OSError, RuntimeError, ValueError) as exc:
                raise CheckpointError(
                    f"tensor {key!r} of checkpoint {source.description} could not be read: {exc}"
                ) from exc
            if tensor.dtype.is_floating_point:
                tensor = tensor.to(device=device, dtype=dtype)
            else:
                tensor = tensor.to(device=device)
            converted[key] = tensor
        tensor = converted[key]
        expected_shape = tuple(skeleton[name].shape)
        if tuple(tensor.shape) != expected_shape:
            raise CheckpointError(
                f"tensor {key!r} of checkpoint {source.description} has shape "
                f"{tuple(tensor.shape)}, but the model config implies {expected_shape}; check "
                "that config_path matches the checkpoint"
            )
        tensors[name] = tensor
        report((index + 1) / total)
    if total == 0:
        report(1.0)
    target.load_state_dict(tensors, strict=True, assign=True)
    return sum(t.numel() * t.element_size() for t in converted.values())
