"""Tests of the split engine: split parts compute what the whole model computes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, OPTConfig, OPTForCausalLM

from slm_trio.errors import (
    ComputeInterruptedError,
    ConfigError,
    InvalidTensorError,
    UnsupportedArchitectureError,
)
from slm_trio.split import (
    ModelPart,
    PartCache,
    SplitModel,
    build_part,
    family_for,
    part_layer_ranges,
    split_model,
    supported_model_types,
)

MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")
ATTENTION = ("eager", "sdpa")
# Split points of a 4-layer model, edges included: empty bottom, trunk and top.
SPLITS = [(0, 0), (0, 4), (4, 4), (2, 2), (1, 3), (0, 2), (2, 4)]
ATOL = 1e-5


def build_whole(tiny_config: Callable[..., Any], model_type: str, attention: str) -> Any:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation=attention)
    return model.eval()


def run_parts(
    split: SplitModel, inputs: torch.Tensor, caches: list[PartCache] | None = None, **kwargs: Any
) -> torch.Tensor:
    output = inputs
    parts = (split.bottom, split.trunk, split.top)
    for index, part in enumerate(parts):
        cache = caches[index] if caches is not None else None
        output = part(output, cache=cache, **kwargs)
    return output


def new_caches(split: SplitModel) -> list[PartCache]:
    return [split.bottom.new_cache(), split.trunk.new_cache(), split.top.new_cache()]


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ids, attention mask and positions of two prompts (5 and 9 tokens), left padded."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (2, 9), generator=generator)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    ids[0, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@pytest.mark.parametrize("layers", SPLITS, ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_prefill_matches_whole(
    tiny_config: Callable[..., Any], model_type: str, attention: str, layers: tuple[int, int]
) -> None:
    model = build_whole(tiny_config, model_type, attention)
    split = split_model(model, layers)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))

    with torch.inference_mode():
        expected = model(ids).logits
        logits = run_parts(split, ids)

    assert logits.shape == (2, 12, 100)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layers", [(1, 3), (0, 0), (4, 4)], ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_incremental_matches_whole_cache(
    tiny_config: Callable[..., Any], model_type: str, attention: str, layers: tuple[int, int]
) -> None:
    model = build_whole(tiny_config, model_type, attention)
    split = split_model(model, layers)
    caches = new_caches(split)
    whole_cache = DynamicCache(config=model.config)
    tokens = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(2))

    with torch.inference_mode():
        # Prefill, then 20 greedy steps; both sides get the whole model's token so that
        # every step compares logits over the same history.
        for step in range(21):
            expected = model(tokens, cache=whole_cache, use_cache=True).logits
            logits = run_parts(split, tokens, caches)
            torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0, msg=f"step {step}")
            assert int(logits[0, -1].argmax()) == int(expected[0, -1].argmax())
            tokens = expected[:, -1:].argmax(-1)

    assert [cache.seq_length for cache in caches] == [26, 26, 26]
    assert [cache.batch_size for cache in caches] == [1, 1, 1]


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_incremental_matches_full_recompute(
    tiny_config: Callable[..., Any], model_type: str, attention: str
) -> None:
    model = build_whole(tiny_config, model_type, attention)
    split = split_model(model, (1, 3))
    caches = new_caches(split)
    history = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(3))

    with torch.inference_mode():
        logits = run_parts(split, history, caches)
        for _ in range(20):
            expected = model(history).logits[:, -1]
            torch.testing.assert_close(logits[:, -1], expected, atol=ATOL, rtol=0)
            token = expected.argmax(-1, keepdim=True)
            history = torch.cat([history, token], dim=-1)
            logits = run_parts(split, token, caches)


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_padded_batch_matches_whole(
    tiny_config: Callable[..., Any], model_type: str, attention: str
) -> None:
    model = build_whole(tiny_config, model_type, attention)
    split = split_model(model, (1, 3))
    ids, mask, positions = left_padded_batch()
    caches = new_caches(split)
    whole_cache = DynamicCache(config=model.config)

    with torch.inference_mode():
        expected = model(
            ids, attention_mask=mask, position_ids=positions, cache=whole_cache, use_cache=True
        ).logits
        logits = run_parts(split, ids, caches, attention_mask=mask, position_ids=positions)
        valid = mask.bool()
        torch.testing.assert_close(logits[valid], expected[valid], atol=ATOL, rtol=0)

        # Decode 12 steps: past the 8-token sliding window of the Mistral and Qwen2 models.
        for step in range(12):
            tokens = expected[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=-1)
            positions = positions[:, -1:] + 1
            expected = model(
                tokens,
                attention_mask=mask,
                position_ids=positions,
                cache=whole_cache,
                use_cache=True,
            ).logits
            logits = run_parts(split, tokens, caches, attention_mask=mask, position_ids=positions)
            torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0, msg=f"step {step}")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_padded_rows_match_unpadded(tiny_config: Callable[..., Any], model_type: str) -> None:
    model = build_whole(tiny_config, model_type, "sdpa")
    split = split_model(model, (1, 3))
    ids, mask, positions = left_padded_batch()

    with torch.inference_mode():
        padded = run_parts(split, ids, attention_mask=mask, position_ids=positions)
        alone = run_parts(split, ids[:1, 4:])

    torch.testing.assert_close(padded[0, 4:], alone[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_gradients_match_whole(tiny_config: Callable[..., Any], model_type: str) -> None:
    model = build_whole(tiny_config, model_type, "sdpa")
    split = split_model(model, (1, 3))
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 100, (2, 10), generator=generator)
    labels = torch.randint(0, 100, (2, 10), generator=generator)

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())

    loss_of(model(ids).logits).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    hidden = split.bottom(ids)
    hidden = split.trunk(hidden)
    loss = loss_of(split.top(hidden))
    loss.backward()

    assert set(expected) == {name for name, _ in model.named_parameters()}
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        torch.testing.assert_close(parameter.grad, expected[name], atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_split_shares_every_parameter(tiny_config: Callable[..., Any], model_type: str) -> None:
    model = build_whole(tiny_config, model_type, "sdpa")
    split = split_model(model, (1, 3))

    whole = {id(p) for p in model.parameters()}
    parts = {id(p) for part in (split.bottom, split.trunk, split.top) for p in part.parameters()}

    assert parts == whole


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_empty_trunk_is_identity(tiny_config: Callable[..., Any], model_type: str) -> None:
    model = build_whole(tiny_config, model_type, "sdpa")
    trunk = split_model(model, (2, 2)).trunk
    hidden = torch.randn(2, 5, 32)

    output = trunk(hidden)

    assert trunk.layer_range == (2, 2)
    assert list(trunk.parameters()) == []
    assert trunk.dtype == torch.float32
    assert torch.equal(output, hidden)


def test_part_metadata(tiny_config: Callable[..., Any]) -> None:
    model = build_whole(tiny_config, "llama", "sdpa")
    split = split_model(model, (1, 3))

    assert [p.kind for p in (split.bottom, split.trunk, split.top)] == ["bottom", "trunk", "top"]
    assert [p.layer_range for p in (split.bottom, split.trunk, split.top)] == [
        (0, 1),
        (1, 3),
        (3, 4),
    ]
    for part in (split.bottom, split.trunk, split.top):
        assert isinstance(part, ModelPart)
        assert part.model_type == "llama"
        assert part.num_hidden_layers == 4
        assert part.hidden_size == 32
        assert part.vocab_size == 100
        assert part.device == torch.device("cpu")
        assert part.dtype == torch.float32
    assert "kind='trunk', model_type='llama', layers=[1, 3) of 4" in repr(split.trunk)


def test_part_state_dict_uses_checkpoint_names(tiny_config: Callable[..., Any]) -> None:
    model = build_whole(tiny_config, "llama", "sdpa")
    split = split_model(model, (1, 3))

    trunk_keys = set(split.trunk.state_dict())
    top_sources = split.top.checkpoint_keys()

    assert "model.layers.1.self_attn.q_proj.weight" in trunk_keys
    assert "model.layers.2.mlp.down_proj.weight" in trunk_keys
    assert not any(key.startswith("model.layers.0.") for key in trunk_keys)
    assert trunk_keys <= set(model.state_dict())
    # SmolLM2-style tied embeddings: the top's head comes from the embedding matrix.
    assert top_sources["lm_head.weight"] == "model.embed_tokens.weight"


def test_cache_counts_tokens_and_bytes(tiny_config: Callable[..., Any]) -> None:
    model = build_whole(tiny_config, "llama", "sdpa")
    split = split_model(model, (1, 3))
    cache = split.trunk.new_cache()
    empty_bottom = split_model(model, (0, 2)).bottom.new_cache()

    assert (cache.seq_length, cache.batch_size, cache.nbytes) == (0, 0, 0)
    with torch.inference_mode():
        split.trunk(torch.randn(3, 7, 32), cache=cache)

    # 2 layers x (keys + values) x 3 rows x 2 kv heads x 7 tokens x 8 dims x 4 bytes
    assert (cache.seq_length, cache.batch_size) == (7, 3)
    assert cache.nbytes == 2 * 2 * 3 * 2 * 7 * 8 * 4
    assert "batch_size=3, seq_length=7" in repr(cache)
    assert empty_bottom.nbytes == 0


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_cache_on_empty_bottom_advances_positions(
    tiny_config: Callable[..., Any], model_type: str
) -> None:
    model = build_whole(tiny_config, model_type, "sdpa")
    bottom = split_model(model, (0, 2)).bottom
    cache = bottom.new_cache()
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(5))

    with torch.inference_mode():
        whole = bottom(ids)
        first = bottom(ids[:, :4], cache=cache)
        second = bottom(ids[:, 4:], cache=cache)

    assert cache.seq_length == 6
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=0, rtol=0)


def test_failed_forward_leaves_cache_unchanged(
    tiny_config: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_whole(tiny_config, "mistral", "sdpa")
    trunk = split_model(model, (1, 3)).trunk
    cache = trunk.new_cache()
    with torch.inference_mode():
        trunk(torch.randn(1, 10, 32), cache=cache)
    keys_before = [layer.keys for layer in cache.kv.layers]
    bytes_before = cache.nbytes

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("layer 2 failed")

    # Layer 1 appends to its cache layer before layer 2 raises.
    monkeypatch.setattr(trunk.model.layers["2"], "forward", fail)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="layer 2 failed"):
        trunk(torch.randn(1, 1, 32), cache=cache)

    assert cache.seq_length == 10
    assert cache.nbytes == bytes_before
    assert all(
        layer.keys is before for layer, before in zip(cache.kv.layers, keys_before, strict=True)
    )


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_should_stop_interrupts_between_layers(
    tiny_config: Callable[..., Any], model_type: str
) -> None:
    model = build_whole(tiny_config, model_type, "sdpa")
    trunk = split_model(model, (1, 3)).trunk  # layers 1 and 2
    cache = trunk.new_cache()
    with torch.inference_mode():
        trunk(torch.randn(1, 4, 32), cache=cache)
    bytes_before = cache.nbytes

    # Allow the first layer, then ask to stop before the second.
    checks: list[int] = []

    def should_stop() -> bool:
        checks.append(len(checks))
        return len(checks) > 1

    with torch.inference_mode(), pytest.raises(ComputeInterruptedError, match="cancelled"):
        trunk(torch.randn(1, 2, 32), cache=cache, should_stop=should_stop)

    assert len(checks) == 2
    assert cache.seq_length == 4
    assert cache.nbytes == bytes_before
    with torch.inference_mode():
        output = trunk(torch.randn(1, 2, 32), cache=cache, should_stop=lambda: False)
    assert output.shape == (1, 2, 32)
    assert cache.seq_length == 6


def test_forward_keeps_autograd_graph(tiny_config: Callable[..., Any]) -> None:
    model = build_whole(tiny_config, "qwen2", "sdpa")
    split = split_model(model, (1, 3))

    hidden = split.trunk(torch.randn(1, 4, 32, requires_grad=True))

    assert hidden.requires_grad
    assert hidden.grad_fn is not None


def test_hidden_of_other_dtype_is_converted(tiny_config: Callable[..., Any]) -> None:
    model = build_whole(tiny_config, "llama", "sdpa")
    trunk = split_model(model, (1, 3)).trunk
    hidden = torch.randn(1, 4, 32)

    with torch.inference_mode():
        output = trunk(hidden.to(torch.float64))
        expected = trunk(hidden)

    assert output.dtype == torch.float32
    torch.testing.assert_close(output, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("part", "inputs", "kwargs", "message"),
    [
        ("bottom", torch.zeros(1, 3), {}, "expected integer token ids"),
        ("bottom", torch.zeros(3, dtype=torch.long), {}, r"shape \(3,\)"),
        ("bottom", torch.tensor([[1, 100]]), {}, "token id 100 is out of range"),
        ("bottom", torch.tensor([[-1, 2]]), {}, "token id -1 is out of range"),
        ("trunk", torch.zeros(1, 3, 16), {}, r"expected hidden states \[batch, seq, 32\]"),
        ("trunk", torch.zeros(1, 0, 32), {}, "seq >= 1"),
        ("trunk", torch.zeros(1, 3, 32, dtype=torch.long), {}, "expected floating"),
        (
            "trunk",
            torch.zeros(2, 3, 32),
            {"attention_mask": torch.ones(2, 4, dtype=torch.long)},
            r"attention_mask has shape \(2, 4\); expected \[2, 3\]",
        ),
        (
            "trunk",
            torch.zeros(1, 3, 32),
            {"attention_mask": torch.tensor([[1, 2, 1]])},
            "values other than 0 and 1",
        ),
        (
            "trunk",
            torch.zeros(1, 3, 32),
            {"attention_mask": torch.ones(1, 3)},
            "expected integers or bool",
        ),
        (
            "trunk",
            torch.zeros(2, 3, 32),
            {"position_ids": torch.zeros(2, 4, dtype=torch.long)},
            r"position_ids have shape \(2, 4\)",
        ),
        (
            "trunk",
            torch.zeros(1, 3, 32),
            {"position_ids": torch.tensor([[-1, 0, 1]])},
            "position id -1 is out of range",
        ),
    ],
)
def test_forward_rejects_invalid_inputs(
    tiny_config: Callable[..., Any],
    part: str,
    inputs: torch.Tensor,
    kwargs: dict[str, Any],
    message: str,
) -> None:
    split = split_model(build_whole(tiny_config, "llama", "sdpa"), (1, 3))

    with pytest.raises(InvalidTensorError, match=message):
        getattr(split, part)(inputs, **kwargs)


def test_gpt2_rejects_positions_past_table(tiny_config: Callable[..., Any]) -> None:
    bottom = split_model(build_whole(tiny_config, "gpt2", "sdpa"), (1, 3)).bottom
    cache = bottom.new_cache()
    bottom(torch.zeros(1, 60, dtype=torch.long), cache=cache)

    with pytest.raises(InvalidTensorError, match=r"position id 64 .* <= 63"):
        bottom(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    assert cache.seq_length == 60


def test_cache_rejects_other_part_and_batch(tiny_config: Callable[..., Any]) -> None:
    split = split_model(build_whole(tiny_config, "llama", "sdpa"), (1, 3))
    cache = split.trunk.new_cache()
    split.trunk(torch.zeros(2, 3, 32), cache=cache)

    with pytest.raises(ValueError, match="belongs to another part"):
        split.top(torch.zeros(2, 1, 32), cache=cache)
    with pytest.raises(InvalidTensorError, match="batch size 1 but the cache contains 2 rows"):
        split.trunk(torch.zeros(1, 1, 32), cache=cache)


@pytest.mark.parametrize("layers", [(3, 2), (0, 5), (-1, 2)])
def test_split_rejects_bad_layers(tiny_config: Callable[..., Any], layers: tuple[int, int]) -> None:
    model = build_whole(tiny_config, "gpt2", "sdpa")

    with pytest.raises(ConfigError, match=r"layers=.* 4 layers; expected \(s1, s2\) with 0 <= s1"):
        split_model(model, layers)


def test_split_rejects_unsupported_model() -> None:
    config = OPTConfig(
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=50,
        word_embed_proj_dim=16,
    )
    model = OPTForCausalLM(config)

    with pytest.raises(UnsupportedArchitectureError, match=r"'opt'.*gpt2, llama, mistral, qwen2"):
        split_model(model, (1, 1))


def test_registry_lists_families() -> None:
    assert supported_model_types() == ("gpt2", "llama", "mistral", "qwen2")
    assert family_for("qwen2").name == "llama"
    assert part_layer_ranges((1, 3), 4) == {"bottom": (0, 1), "trunk": (1, 3), "top": (3, 4)}


def test_build_part_defaults_to_sdpa(tiny_config: Callable[..., Any]) -> None:
    config = tiny_config("llama")

    part = build_part(config, "trunk", (1, 3), dtype=torch.float32, device=torch.device("cpu"))

    assert config._attn_implementation is None
    assert part.config._attn_implementation == "sdpa"
