"""Attention Matching compaction and KV-cache quantization (model.attention_matching,
model.quantized_cache): the compaction's fits on random blocks, the press and the cache on a tiny
random decoder, positions and KV bytes."""

import math

import pytest
import torch

from model.attention_matching import (
    AttentionMatchingPress,
    attention_matching_forward,
    block_output,
    compact_block,
    compact_size,
)
from model.presses import PRESSES, kept_positions, make_press, new_cache, stored_kv_bytes
from tests.tiny_models import build_tiny_lclm

D = 16
SCALE = 1 / math.sqrt(D)


def random_block(seed: int, T: int = 64, heads: int = 2, n: int = 512, held_out: int = 256):
    """keys, values [1, H, T, d]; reference and held-out queries [1, H, n, d] from one distribution."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, heads, T, D, generator=g) * 1.5
    values = torch.randn(1, heads, T, D, generator=g)
    queries = torch.randn(1, heads, n + held_out, D, generator=g) * 1.5
    return keys, values, queries[:, :, :n], queries[:, :, n:]


def output_error(compacted, keys, values, queries, bias=True) -> float:
    exact = block_output(keys, values, queries, SCALE)
    approx = block_output(compacted.keys, compacted.values, queries, SCALE, compacted.log_bias if bias else None)
    return (approx - exact).pow(2).mean().item()


# ---- the fits ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_nothing_removed_reproduces_the_attention_output_exactly():
    keys, values, reference, held_out = random_block(0)
    compacted = compact_block(keys, values, reference, size=keys.shape[2], scaling=SCALE)
    exact = block_output(keys, values, held_out, SCALE)
    approx = block_output(compacted.keys, compacted.values, held_out, SCALE, compacted.log_bias)
    assert torch.allclose(approx, exact, atol=1e-5)
    assert torch.allclose(compacted.weights, torch.ones_like(compacted.weights), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("size", [4, 8, 16, 32])
def test_fits_beat_the_same_top_attention_keys_on_held_out_queries(seed, size):
    keys, values, reference, held_out = random_block(seed)
    fitted = compact_block(keys, values, reference, size, SCALE)
    kept = compact_block(keys, values, reference, size, SCALE, refit=False)
    assert torch.equal(fitted.indices, kept.indices) and torch.equal(fitted.keys, kept.keys)
    assert output_error(fitted, keys, values, held_out) < output_error(kept, keys, values, held_out, bias=False)


def test_mass_weights_are_non_negative_and_finite():
    for seed in range(4):
        keys, values, reference, _ = random_block(seed, T=48)
        compacted = compact_block(keys, values, reference, 6, SCALE)
        assert (compacted.weights >= 0).all() and torch.isfinite(compacted.weights).all()
        assert torch.isfinite(compacted.log_bias).all() and torch.isfinite(compacted.values).all()


def test_the_attention_function_adds_the_bias_to_the_compacted_positions():
    """sdpa with the biases equals softmax(q k^T s + [bias, 0]) v, query head h on KV head h // 2."""
    g = torch.Generator().manual_seed(5)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    query = torch.randn(1, 4, 3, D, generator=g)  # [B, heads, q, d]
    key, value = torch.randn(1, 2, 10, D, generator=g), torch.randn(1, 2, 10, D, generator=g)  # [B, kv_heads, k, d]
    bias = torch.randn(1, 2, 6, generator=g)  # [B, kv_heads, t]: the first 6 positions are compacted
    out, _ = attention_matching_forward(module, query, key, value, None, attention_bias=bias, scaling=SCALE)
    k, v = key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1)  # [B, heads, k, d]
    logits = query @ k.transpose(-1, -2) * SCALE  # [B, heads, q, k]
    logits[..., :6] += bias.repeat_interleave(2, dim=1)[:, :, None, :]
    causal = torch.arange(10)[None, :] <= torch.arange(7, 10)[:, None]  # the queries are the last 3 positions
    expected = logits.masked_fill(~causal, float("-inf")).softmax(-1) @ v  # [B, heads, q, d]
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-5)


# ---- the press on a tiny decoder --------------------------------------------------------------
@pytest.fixture(scope="module")
def decoder():
    """A tiny random Llama decoder of our own (the press changes its attention implementation)."""
    return build_tiny_lclm(family="llama").decoder.eval()


def context_and_question(length: int = 40, question: int = 5):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(10, 300, (1, length + question), generator=g)
    return ids[:, :length], ids[:, length:]  # [1, C], [1, Q]


@torch.inference_mode()
def question_logits(decoder, press=None):
    """Logits of the question's tokens over the (compressed) context, at their uncompressed positions."""
    context, question = context_and_question()
    cache = new_cache(press, decoder.config) if press is not None else new_cache(None, decoder.config)
    if press is None:
        decoder.model(input_ids=context, past_key_values=cache)
    else:
        with press(decoder):
            decoder.model(input_ids=context, past_key_values=cache)
    positions = torch.arange(context.shape[1], context.shape[1] + question.shape[1])[None]  # [1, Q]
    logits = decoder(input_ids=question, past_key_values=cache, position_ids=positions).logits  # [1, Q, vocab]
    return logits, cache


@pytest.mark.slow
def test_press_keeping_every_entry_answers_as_the_full_cache(decoder):
    full, _ = question_logits(decoder)
    press = AttentionMatchingPress(compression_ratio=0.01)  # t = ceil(0.99 * 40) = 40: the fits run, nothing goes
    same, cache = question_logits(decoder, press)
    assert cache.get_seq_length() == 40 + 5 and set(cache.attention_biases) == {0, 1}
    assert torch.allclose(same, full, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [2, 4, 8, 16])
def test_press_keeps_ceil_T_over_N_entries_per_layer_and_head(decoder, ratio):
    press = make_press("attention_matching", ratio)
    assert press.compression_ratio == 1 - 1 / ratio
    logits, cache = question_logits(decoder, press)
    kept = math.ceil(40 / ratio)
    assert kept_positions(press, 40) == kept
    kv_heads = decoder.config.num_key_value_heads
    for layer in range(decoder.config.num_hidden_layers):
        assert cache.layers[layer].keys.shape == (1, kv_heads, kept + 5, D)  # the compacted context + the question
        assert cache.attention_biases[layer].shape == (1, kv_heads, kept)
    assert torch.isfinite(logits).all()


def test_the_biases_change_the_answer(decoder):
    """Dropping the biases from the cache changes the logits: they are applied in attention."""
    press = make_press("attention_matching", 4)
    context, question = context_and_question()
    with torch.inference_mode():
        cache = new_cache(press, decoder.config)
        with press(decoder):
            decoder.model(input_ids=context, past_key_values=cache)
        positions = torch.arange(40, 45)[None]
        import copy

        plain = copy.deepcopy(cache)
        plain.attention_biases = None
        biased = decoder(input_ids=question, past_key_values=cache, position_ids=positions).logits
        unbiased = decoder(input_ids=question, past_key_values=plain, position_ids=positions).logits
    assert not torch.allclose(biased, unbiased, atol=1e-4)


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
def test_bad_compression_ratios_say_so(ratio):
    with pytest.raises(ValueError, match=r"share of KV pairs removed and must be in \[0, 1\)"):
        AttentionMatchingPress(compression_ratio=ratio)


@pytest.mark.parametrize("ratio", [0, -4, 2.5])
def test_bad_lclm_ratios_say_so(ratio):
    with pytest.raises(ValueError, match="compression ratio N"):
        make_press("attention_matching", ratio)


def test_compact_size_is_ceil():
    assert [compact_size(40, 1 - 1 / n) for n in (1, 2, 3, 4, 16, 64)] == [40, 20, 14, 10, 3, 1]
    with pytest.raises(ValueError, match="cannot be compacted"):
        compact_block(*random_block(0, T=8)[:3], size=9, scaling=SCALE)


def test_every_baseline_is_registered():
    assert {"attention_matching", "quantized_4bit", "quantized_2bit", "snapkv", "kvzip"} <= set(PRESSES)


# ---- the quantized cache ------------------------------------------------------------------------
def test_quantized_cache_stays_close_to_the_float_cache(decoder):
    full, _ = question_logits(decoder)
    four, cache4 = question_logits(decoder, make_press("quantized_4bit", 4))
    two, _ = question_logits(decoder, make_press("quantized_2bit", 4))
    assert cache4.get_seq_length() == 45  # every position kept
    cos4, cos2 = (torch.cosine_similarity(x.flatten(), full.flatten(), dim=0).item() for x in (four, two))
    # Tolerance: 4-bit logits keep a cosine similarity of at least 0.9 with the float cache's (0.94 here; the
    # tiny random decoder amplifies errors that a trained one does not); 2 bits are further off (0.35).
    assert cos4 >= 0.9 and cos2 < cos4


def test_quantized_kv_bytes_as_stored(decoder):
    """2 tensors x layers x (packed bits + one float32 scale and zero-point per group of 16), plus the
    question's float residual."""
    from model.quantized_cache import quantized_bytes

    cfg = decoder.config
    for name, bits in (("quantized_4bit", 4), ("quantized_2bit", 2)):
        press = make_press(name, 4)
        _, cache = question_logits(decoder, press)
        layers, kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
        context = kv_heads * 40 * D  # entries per key (or value) tensor of a layer
        by_hand = 2 * layers * (quantized_bytes(context, bits, 16, 4) + kv_heads * 5 * D * 4)
        assert by_hand == 2 * layers * (context * bits // 8 + 2 * context // 16 * 4 + kv_heads * 5 * D * 4)
        assert stored_kv_bytes(press, cache) == by_hand
    assert stored_kv_bytes(make_press("snapkv", 4), cache) is None


def test_the_residual_length_decides_when_new_positions_are_quantized(decoder):
    """The context is quantized at once; newer positions stay in float until the residual fills."""
    from model.quantized_cache import quantized_bytes

    layers, kv_heads = decoder.config.num_hidden_layers, decoder.config.num_key_value_heads
    for residual, floats in ((2, 0), (64, 6)):  # positions held in float after the question and one more token
        press = make_press("quantized_4bit", 4, residual_length=residual)
        assert press.residual_length == residual
        _, cache = question_logits(decoder, press)
        with torch.inference_mode():
            decoder(input_ids=torch.tensor([[11]]), past_key_values=cache, position_ids=torch.tensor([[45]]))
        quantized = 46 - floats
        expected = 2 * layers * (quantized_bytes(kv_heads * quantized * D, 4, 16, 4) + kv_heads * floats * D * 4)
        assert cache.get_seq_length() == 46 and stored_kv_bytes(press, cache) == expected


def test_quantized_settings_say_what_is_wrong():
    from model.quantized_cache import QuantizedKV

    with pytest.raises(ValueError, match="2 or 4 bits, got 8"):
        QuantizedKV(bits=8)
    with pytest.raises(ValueError, match="residual_length must be at least 1"):
        QuantizedKV(residual_length=0)
