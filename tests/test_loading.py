"""Tests of model and part loading: parts loaded alone compute what the whole model computes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DynamicCache, OPTConfig, OPTForCausalLM

from slm_trio.config import ModelConfig
from slm_trio.errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from slm_trio.loading import _GGUFSource, _SafetensorsSource, load_model, load_tokenizer
from slm_trio.split import ModelPart

MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")
ATTENTION = ("eager", "sdpa")
SPLITS = [(1, 3), (0, 0), (0, 4), (4, 4), (2, 2)]
ATOL = 1e-5


def load_parts(path: Path, layers: tuple[int, int], **fields: Any) -> list[ModelPart]:
    parts = []
    for kind in ("bottom", "trunk", "top"):
        config = ModelConfig(
            model_id=f"test-{kind}", model_path=str(path), part=kind, layers=layers, **fields
        )
        part = load_model(config)
        assert isinstance(part, ModelPart)
        parts.append(part)
    return parts


def run_parts(
    parts: list[ModelPart], inputs: torch.Tensor, caches: list[Any] | None = None, **kwargs: Any
) -> torch.Tensor:
    output = inputs
    for index, part in enumerate(parts):
        cache = caches[index] if caches is not None else None
        output = part(output, cache=cache, **kwargs)
    return output


def load_whole(path: Path, attention: str = "sdpa") -> Any:
    return AutoModelForCausalLM.from_pretrained(str(path), attn_implementation=attention).eval()


def copy_checkpoint(source: Path, target: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Copy a tiny model directory, changing its tensors with ``edit``."""
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(str(source / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("layers", SPLITS, ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_loaded_parts_prefill_match_whole(
    tiny_model_dirs: dict[str, Path], model_type: str, attention: str, layers: tuple[int, int]
) -> None:
    path = tiny_model_dirs[model_type]
    whole = load_whole(path, attention)
    parts = load_parts(path, layers, attn_implementation=attention)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))

    with torch.inference_mode():
        expected = whole(ids).logits
        logits = run_parts(parts, ids)

    assert [part.layer_range for part in parts] == [(0, layers[0]), layers, (layers[1], 4)]
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_loaded_parts_decode_match_whole(
    tiny_model_dirs: dict[str, Path], model_type: str, attention: str
) -> None:
    path = tiny_model_dirs[model_type]
    whole = load_whole(path, attention)
    parts = load_parts(path, (1, 3), attn_implementation=attention)
    caches = [part.new_cache() for part in parts]
    whole_cache = DynamicCache(config=whole.config)
    tokens = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(1))

    with torch.inference_mode():
        # Prefill, then 20 greedy steps fed with the whole model's token.
        for step in range(21):
            expected = whole(tokens, cache=whole_cache, use_cache=True).logits
            logits = run_parts(parts, tokens, caches)
            torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0, msg=f"step {step}")
            tokens = expected[:, -1:].argmax(-1)


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_loaded_parts_padded_batch_match_whole(
    tiny_model_dirs: dict[str, Path], model_type: str, attention: str
) -> None:
    path = tiny_model_dirs[model_type]
    whole = load_whole(path, attention)
    parts = load_parts(path, (1, 3), attn_implementation=attention)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = [part.new_cache() for part in parts]
    whole_cache = DynamicCache(config=whole.config)

    with torch.inference_mode():
        expected = whole(
            ids, attention_mask=mask, position_ids=positions, cache=whole_cache, use_cache=True
        ).logits
        logits = run_parts(parts, ids, caches, attention_mask=mask, position_ids=positions)
        valid = mask.bool()
        torch.testing.assert_close(logits[valid], expected[valid], atol=ATOL, rtol=0)

        for step in range(10):
            tokens = expected[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=-1)
            positions = positions[:, -1:] + 1
            expected = whole(
                tokens,
                attention_mask=mask,
                position_ids=positions,
                cache=whole_cache,
                use_cache=True,
            ).logits
            logits = run_parts(parts, tokens, caches, attention_mask=mask, position_ids=positions)
            torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0, msg=f"step {step}")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_full_load_matches_from_pretrained(
    tiny_model_dirs: dict[str, Path], model_type: str
) -> None:
    path = tiny_model_dirs[model_type]
    whole = load_whole(path)
    config = ModelConfig(model_id="full", model_path=str(path))
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(3))

    model = load_model(config)
    with torch.inference_mode():
        logits = model(ids).logits
        expected = whole(ids).logits

    assert type(model) is type(whole)
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_full_load_ties_embeddings(tiny_model_dirs: dict[str, Path]) -> None:
    model = load_model(ModelConfig(model_id="full", model_path=str(tiny_model_dirs["llama"])))

    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_full_load_reads_generation_config(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    whole = load_whole(tiny_model_dirs["llama"])
    whole.generation_config.max_new_tokens = 7
    whole.save_pretrained(tmp_path)

    model = load_model(ModelConfig(model_id="full", model_path=str(tmp_path)))

    assert model.generation_config.max_new_tokens == 7


def test_trunk_reads_only_its_tensors(
    tiny_model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[str] = []
    original = _SafetensorsSource._read_file_tensor

    def record(source: _SafetensorsSource, name: str) -> torch.Tensor:
        read.append(name)
        return original(source, name)

    monkeypatch.setattr(_SafetensorsSource, "_read_file_tensor", record)
    config = ModelConfig(
        model_id="trunk", model_path=str(tiny_model_dirs["llama"]), part="trunk", layers=(1, 3)
    )

    trunk = load_model(config)

    assert sorted(read) == sorted(trunk.state_dict())
    assert all(name.startswith(("model.layers.1.", "model.layers.2.")) for name in read)


def test_top_takes_tied_embeddings(tiny_model_dirs: dict[str, Path]) -> None:
    path = tiny_model_dirs["llama"]
    stored = load_file(str(path / "model.safetensors"))
    config = ModelConfig(model_id="top", model_path=str(path), part="top", layers=(1, 3))

    top = load_model(config)

    assert "lm_head.weight" not in stored
    assert torch.equal(top.lm_head.weight, stored["model.embed_tokens.weight"])


def test_sharded_checkpoint_loads(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    whole = load_whole(tiny_model_dirs["qwen2"])
    whole.save_pretrained(tmp_path, max_shard_size="20KB")
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(4))

    parts = load_parts(tmp_path, (1, 3))
    with torch.inference_mode():
        logits = run_parts(parts, ids)
        expected = whole(ids).logits

    assert (tmp_path / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_state_dict_file_loads(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    source = tiny_model_dirs["mistral"]
    whole = load_whole(source)
    checkpoint = tmp_path / "weights.pt"
    torch.save(whole.state_dict(), checkpoint)
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(5))

    parts = load_parts(checkpoint, (1, 3), config_path=str(source / "config.json"))
    full = load_model(
        ModelConfig(model_id="full", model_path=str(checkpoint), config_path=str(source))
    )
    with torch.inference_mode():
        expected = whole(ids).logits
        split_logits = run_parts(parts, ids)
        full_logits = full(ids).logits

    torch.testing.assert_close(split_logits, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(full_logits, expected, atol=ATOL, rtol=0)


def test_state_dict_uses_config_beside_it(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    source = tiny_model_dirs["gpt2"]
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    checkpoint = tmp_path / "weights.pth"
    torch.save(load_whole(source).state_dict(), checkpoint)
    config = ModelConfig(model_id="trunk", model_path=str(checkpoint), part="trunk", layers=(1, 3))

    trunk = load_model(config)

    assert isinstance(trunk, ModelPart)
    assert trunk.model_type == "gpt2"


def test_pickled_module_is_rejected(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    source = tiny_model_dirs["llama"]
    checkpoint = tmp_path / "model.pt"
    torch.save(load_whole(source), checkpoint)
    config = ModelConfig(
        model_id="pickled",
        model_path=str(checkpoint),
        config_path=str(source),
        part="trunk",
        layers=(1, 3),
    )

    with pytest.raises(CheckpointError, match="pickled object, not a state dict") as caught:
        load_model(config)

    assert "weights_only=True" in str(caught.value)
    assert "Save model.state_dict()" in str(caught.value)


def test_missing_trunk_tensor_is_named(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    missing = "model.layers.1.mlp.up_proj.weight"
    path = copy_checkpoint(
        tiny_model_dirs["llama"], tmp_path / "broken", lambda tensors: tensors.pop(missing)
    )
    trunk = ModelConfig(model_id="trunk", model_path=str(path), part="trunk", layers=(1, 3))
    bottom = ModelConfig(model_id="bottom", model_path=str(path), part="bottom", layers=(1, 3))

    with pytest.raises(CheckpointError, match=f"missing 1 tensor\\(s\\) '{missing}'"):
        load_model(trunk)
    # The bottom does not need layer 1, so it loads.
    assert isinstance(load_model(bottom), ModelPart)


def test_unexpected_tensor_is_named(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    extra = "model.layers.9.self_attn.q_proj.weight"

    def add_extra(tensors: dict[str, Any]) -> None:
        tensors[extra] = torch.zeros(32, 32)

    path = copy_checkpoint(tiny_model_dirs["llama"], tmp_path / "extra", add_extra)
    config = ModelConfig(model_id="trunk", model_path=str(path), part="trunk", layers=(1, 3))

    with pytest.raises(CheckpointError, match=f"1 unexpected tensor\\(s\\) '{extra}'"):
        load_model(config)


def test_wrong_shape_is_named(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    name = "model.layers.2.self_attn.o_proj.weight"

    def shrink(tensors: dict[str, Any]) -> None:
        tensors[name] = torch.zeros(32, 16)

    path = copy_checkpoint(tiny_model_dirs["llama"], tmp_path / "shape", shrink)
    config = ModelConfig(model_id="trunk", model_path=str(path), part="trunk", layers=(1, 3))

    with pytest.raises(CheckpointError, match=rf"'{name}' .* shape \(32, 16\).* \(32, 32\)"):
        load_model(config)


def test_base_model_names_load(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A GPT-2 checkpoint saved from GPT2Model, with its legacy attention mask buffers."""

    def strip_prefix(tensors: dict[str, Any]) -> None:
        for name in list(tensors):
            tensors[name.removeprefix("transformer.")] = tensors.pop(name)
        tensors["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)

    source = tiny_model_dirs["gpt2"]
    path = copy_checkpoint(source, tmp_path / "base", strip_prefix)
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(6))

    parts = load_parts(path, (1, 3))
    with torch.inference_mode():
        logits = run_parts(parts, ids)
        expected = load_whole(source)(ids).logits

    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_unsupported_model_type_is_named(tmp_path: Path) -> None:
    config = OPTConfig(
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=50,
        word_embed_proj_dim=16,
    )
    OPTForCausalLM(config).save_pretrained(tmp_path)

    with pytest.raises(UnsupportedArchitectureError, match=r"'opt'.*gpt2, llama, mistral, qwen2"):
        load_model(
            ModelConfig(model_id="opt", model_path=str(tmp_path), part="trunk", layers=(1, 1))
        )


@pytest.mark.parametrize("layers", [(2, 9), (5, 5)])
def test_bad_layers_are_named(tiny_model_dirs: dict[str, Path], layers: tuple[int, int]) -> None:
    config = ModelConfig(
        model_id="trunk", model_path=str(tiny_model_dirs["qwen2"]), part="trunk", layers=layers
    )

    with pytest.raises(ConfigError, match=rf"layers=\({layers[0]}, {layers[1]}\) .* s2 <= 4"):
        load_model(config)


def test_model_type_mismatch_names_both(tiny_model_dirs: dict[str, Path]) -> None:
    config = ModelConfig(
        model_id="full", model_path=str(tiny_model_dirs["llama"]), model_type="gpt2"
    )

    with pytest.raises(ConfigError, match="model_type='gpt2' .* model_type is 'llama'"):
        load_model(config)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("part", ["full", "bottom", "trunk", "top"])
def test_dtype_is_honoured(tiny_model_dirs: dict[str, Path], part: str, dtype: str) -> None:
    config = ModelConfig(
        model_id="half",
        model_path=str(tiny_model_dirs["llama"]),
        part=part,
        layers=None if part == "full" else (1, 3),
        dtype=dtype,
    )
    expected = getattr(torch, dtype)

    model = load_model(config)

    assert {p.dtype for p in model.parameters()} == {expected}
    if isinstance(model, ModelPart):
        assert model.dtype == expected
        inputs = torch.zeros(1, 3, dtype=torch.long) if part == "bottom" else torch.zeros(1, 3, 32)
        with torch.inference_mode():
            assert model(inputs).dtype == expected


def test_auto_dtype_is_checkpoint_dtype(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    load_whole(tiny_model_dirs["llama"]).to(torch.bfloat16).save_pretrained(tmp_path)
    config = ModelConfig(
        model_id="auto", model_path=str(tmp_path), part="trunk", layers=(1, 3), dtype="auto"
    )

    trunk = load_model(config)

    assert trunk.dtype == torch.bfloat16


def test_global_torch_settings_unchanged(tiny_model_dirs: dict[str, Path]) -> None:
    before = (torch.get_default_dtype(), torch.get_num_threads())
    for part in ("full", "trunk"):
        load_model(
            ModelConfig(
                model_id="half",
                model_path=str(tiny_model_dirs["gpt2"]),
                part=part,
                layers=None if part == "full" else (1, 3),
                dtype="float16",
            )
        )

    assert (torch.get_default_dtype(), torch.get_num_threads()) == before


def test_progress_reports_each_tensor(tiny_model_dirs: dict[str, Path]) -> None:
    fractions: list[float] = []
    config = ModelConfig(
        model_id="trunk", model_path=str(tiny_model_dirs["llama"]), part="trunk", layers=(1, 3)
    )

    trunk = load_model(config, fractions.append)

    assert fractions[0] == 0.0
    assert fractions[-1] == 1.0
    assert fractions == sorted(fractions)
    assert len(fractions) == len(trunk.state_dict()) + 1


def test_progress_reports_empty_trunk(tiny_model_dirs: dict[str, Path]) -> None:
    fractions: list[float] = []
    config = ModelConfig(
        model_id="trunk", model_path=str(tiny_model_dirs["llama"]), part="trunk", layers=(2, 2)
    )

    load_model(config, fractions.append)

    assert fractions == [0.0, 1.0]


def test_progress_exception_stops_load(tiny_model_dirs: dict[str, Path]) -> None:
    class Cancelled(Exception):
        pass

    def cancel_midway(fraction: float) -> None:
        if fraction >= 0.5:
            raise Cancelled

    config = ModelConfig(model_id="full", model_path=str(tiny_model_dirs["gpt2"]))

    with pytest.raises(Cancelled):
        load_model(config, cancel_midway)


@pytest.mark.parametrize("size", [12, 1_000_000])
def test_damaged_gguf_is_named(smollm2_path: Path, tmp_path: Path, size: int) -> None:
    damaged = tmp_path / "damaged.gguf"
    with smollm2_path.open("rb") as source:
        damaged.write_bytes(source.read(size))
    config = ModelConfig(model_id="x", model_path=str(damaged), part="trunk", layers=(4, 26))
    with pytest.raises(CheckpointError, match=f"{str(damaged)!r}") as info:
        load_model(config)
    if size > 100:
        assert f"({size} bytes) ends in the middle of its metadata" in str(info.value)


def test_missing_path_is_named(tmp_path: Path) -> None:
    path = str(tmp_path / "absent")

    with pytest.raises(ConfigError, match="does not exist"):
        load_model(ModelConfig(model_id="absent", model_path=path))


def test_unknown_suffix_is_named(tmp_path: Path) -> None:
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"")

    with pytest.raises(ConfigError, match=r"unknown suffix '\.onnx'"):
        load_model(ModelConfig(model_id="onnx", model_path=str(path)))


def test_missing_config_is_named(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = tmp_path / "weights.pt"
    torch.save(load_whole(tiny_model_dirs["llama"]).state_dict(), checkpoint)

    with pytest.raises(ConfigError, match="config.json' does not exist; set config_path"):
        load_model(ModelConfig(model_id="full", model_path=str(checkpoint)))


def test_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))

    with pytest.raises(CheckpointError, match="contains no weights"):
        load_model(ModelConfig(model_id="empty", model_path=str(tmp_path)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_unavailable_device_is_named(tiny_model_dirs: dict[str, Path]) -> None:
    config = ModelConfig(model_id="gpu", model_path=str(tiny_model_dirs["llama"]), device="cuda")

    with pytest.raises(ConfigError, match="device='cuda' is not available"):
        load_model(config)


def test_tokenizer_missing_is_named(tiny_model_dirs: dict[str, Path]) -> None:
    config = ModelConfig(model_id="tiny", model_path=str(tiny_model_dirs["llama"]))

    with pytest.raises(CheckpointError, match="no tokenizer could be read"):
        load_tokenizer(config)


@pytest.mark.slow
def test_smollm2_split_generation_matches_generate(
    smollm2_path: Path, smollm2_whole: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    dequantised: list[str] = []
    original = _GGUFSource._read_file_tensor

    def record(source: _GGUFSource, name: str) -> torch.Tensor:
        dequantised.append(name)
        return original(source, name)

    monkeypatch.setattr(_GGUFSource, "_read_file_tensor", record)
    tokenizer = load_tokenizer(ModelConfig(model_id="smollm2", model_path=str(smollm2_path)))
    parts = []
    read_by_part = {}
    for kind in ("bottom", "trunk", "top"):
        config = ModelConfig(
            model_id=f"smollm2-{kind}", model_path=str(smollm2_path), part=kind, layers=(4, 26)
        )
        parts.append(load_model(config))
        read_by_part[kind] = list(dequantised)
        dequantised.clear()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    eos = smollm2_whole.generation_config.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos)

    with torch.inference_mode():
        expected = smollm2_whole.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=30,
        )[0, prompt.shape[1] :].tolist()
        caches = [part.new_cache() for part in parts]
        logits = run_parts(parts, prompt, caches)
        generated: list[int] = []
        for _ in range(30):
            token = int(logits[0, -1].argmax())
            generated.append(token)
            if token in eos_ids:
                break
            logits = run_parts(parts, torch.tensor([[token]]), caches)

    assert generated == expected
    assert "Paris" in tokenizer.decode(generated)
    # Each part dequantised only its own tensors: the trunk only blocks 4 to 25.
    trunk_blocks = {int(name.split(".")[1]) for name in read_by_part["trunk"]}
    assert trunk_blocks == set(range(4, 26))
    assert len(read_by_part["trunk"]) == len(parts[1].state_dict())
    assert "token_embd.weight" in read_by_part["top"]
    assert [p.layer_range for p in parts] == [(0, 4), (4, 26), (26, 30)]
