"""Encoder side: latent counts per window, the three poolings, left padding and the mask type."""

import math

import pytest
import torch

from model.encoder import DEFAULT_BATCH_TOKENS, count_latents, latent_spans, window_lengths
from tests.tiny_models import CORPUS

FAMILIES = ["qwen3", "llama"]
POOLINGS = ["mean", "concat", "eos"]
W, N = 16, 4


def doc_ids(lclm, count: int) -> list[int]:
    ids = lclm.tokenize_document(CORPUS).ids
    assert len(ids) >= count
    return ids[:count]


def expected_latents(num_tokens: int, window: int, ratio: int) -> int:
    return sum(math.ceil(min(window, num_tokens - s) / ratio) for s in range(0, num_tokens, window))


# (T, expected latents with W=16, N=4)
COUNT_CASES = [
    (32, 8),  # exact multiple of W
    (24, 6),  # partial last window made of whole groups
    (18, 5),  # partial last window ending in a partial group: 4 + ceil(2/4)
    (14, 4),  # one window, partial last group: ceil(14/4)
    (35, 9),  # 4 + 4 + ceil(3/4)
    (3, 1),  # T < N
    (1, 1),  # a single token
]


@pytest.mark.parametrize("num_tokens,expected", COUNT_CASES)
def test_count_latents_and_spans(num_tokens, expected):
    assert count_latents(num_tokens, W, N) == expected == expected_latents(num_tokens, W, N)
    spans = latent_spans(num_tokens, W, N)
    assert len(spans) == expected
    # the spans tile the document in order, never cross a window boundary, and hold at most N tokens
    assert spans[0][0] == 0 and spans[-1][1] == num_tokens
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(0 < end - start <= N and start // W == (end - 1) // W for start, end in spans)
    assert sum(window_lengths(num_tokens, W)) == num_tokens


@pytest.mark.parametrize("window,ratio", [(8, 8), (12, 4), (32, 16), (1024, 16), (6, 1)])
@pytest.mark.parametrize("num_tokens", [1, 5, 7, 8, 9, 31, 33, 1000, 2049])
def test_count_latents_other_shapes(window, ratio, num_tokens):
    assert count_latents(num_tokens, window, ratio) == expected_latents(num_tokens, window, ratio)
    assert len(latent_spans(num_tokens, window, ratio)) == count_latents(num_tokens, window, ratio)


@pytest.mark.slow
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("num_tokens,expected", COUNT_CASES)
def test_compress_shapes_match_counts(tiny_lclm_factory, pooling, num_tokens, expected):
    lclm = tiny_lclm_factory(pooling=pooling)
    ids = doc_ids(lclm, num_tokens)
    pooled = lclm.encoder(ids)  # before the adapter
    latents = lclm.compress(ids)
    assert pooled.shape == (expected, lclm.encoder.latent_dim)
    assert latents.shape == (expected, lclm.decoder_hidden_size)
    assert lclm.count_latents(num_tokens) == expected == len(lclm.latent_spans(num_tokens))
    assert torch.isfinite(latents).all()


def test_compress_refuses_an_empty_document(tiny_lclm_factory):
    with pytest.raises(ValueError):
        tiny_lclm_factory().compress([])


def window_hidden(lclm, ids: list[int]) -> torch.Tensor:
    """Encoder last hidden states of one unpadded window: [L, H]."""
    with torch.inference_mode():
        return lclm.encoder.model(input_ids=torch.tensor([ids])).last_hidden_state[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_mean_pooling_averages_only_real_states(tiny_lclm_factory, family):
    lclm = tiny_lclm_factory(family=family, pooling="mean")
    ids = doc_ids(lclm, 14)  # groups of 4, 4, 4, 2
    hidden = window_hidden(lclm, ids)
    with torch.inference_mode():
        pooled = lclm.encoder(ids)
    expected = torch.stack([hidden[s:e].mean(0) for s, e in [(0, 4), (4, 8), (8, 12), (12, 14)]])
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)
    # and not a mean over N states that include padding or zeros
    assert not torch.allclose(pooled[-1], hidden[12:14].sum(0) / N, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_concat_pooling_zero_pads_a_short_last_group(tiny_lclm_factory, family):
    lclm = tiny_lclm_factory(family=family, pooling="concat")
    hidden_size = lclm.encoder.hidden_size
    assert lclm.encoder.latent_dim == N * hidden_size
    ids = doc_ids(lclm, 14)
    hidden = window_hidden(lclm, ids)
    with torch.inference_mode():
        pooled = lclm.encoder(ids)
    assert pooled.shape == (4, N * hidden_size)
    for g in range(3):
        torch.testing.assert_close(pooled[g], hidden[4 * g : 4 * g + 4].flatten(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled[3, : 2 * hidden_size], hidden[12:14].flatten(), atol=1e-5, rtol=1e-5)
    assert torch.equal(pooled[3, 2 * hidden_size :], torch.zeros(2 * hidden_size))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_tokens", [16, 14, 3, 1])
def test_eos_pooling_appends_pad_markers(tiny_lclm_factory, family, num_tokens):
    lclm = tiny_lclm_factory(family=family, pooling="eos")
    ids = doc_ids(lclm, num_tokens)
    markers = math.ceil(num_tokens / N)
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["input_ids"].clone())

    handle = lclm.encoder.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            pooled = lclm.encoder(ids)
    finally:
        handle.remove()
    (input_ids,) = seen
    assert input_ids.shape == (1, num_tokens + markers)
    assert input_ids[0, :num_tokens].tolist() == ids
    pad = lclm.encoder_tokenizer.pad_token_id
    assert pad not in (None, 0) and lclm.encoder.pad_token_id == pad  # not 0, so a stray 0 would show
    assert input_ids[0, num_tokens:].tolist() == [pad] * markers
    # the latents are the markers' final hidden states
    hidden = window_hidden(lclm, ids + [pad] * markers)
    torch.testing.assert_close(pooled, hidden[num_tokens:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "family,pooling,mask",
    [(f, p, "causal") for f in FAMILIES for p in POOLINGS] + [("qwen3", "mean", "bidirectional")],
)
def test_left_padding_does_not_change_a_window(tiny_lclm_factory, family, pooling, mask):
    lclm = tiny_lclm_factory(family=family, pooling=pooling, mask=mask)
    ids = doc_ids(lclm, W + 6)  # a full window, then a partial one (left-padded in the batch)
    whole = lclm.compress(ids)
    first, last = lclm.compress(ids[:W]), lclm.compress(ids[W:])
    assert whole.shape[0] == first.shape[0] + last.shape[0] == 4 + 2
    torch.testing.assert_close(whole[4:], last, atol=1e-5, rtol=0)
    torch.testing.assert_close(whole[:4], first, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_windows_are_encoded_independently(tiny_lclm_factory, family):
    """Tokens of one window do not influence another window's latents."""
    lclm = tiny_lclm_factory(family=family)
    ids = doc_ids(lclm, 2 * W)
    changed = ids[:W] + [ids[W + 1]] + ids[W + 1 :]
    assert changed != ids
    a, b = lclm.compress(ids), lclm.compress(changed)
    torch.testing.assert_close(a[:4], b[:4], atol=1e-5, rtol=0)
    assert not torch.allclose(a[4], b[4], atol=1e-4)


@pytest.mark.parametrize("pooling", ["mean", "eos"])
def test_position_ids_restart_in_each_left_padded_window(tiny_lclm_factory, pooling):
    lclm = tiny_lclm_factory(pooling=pooling)
    ids = doc_ids(lclm, W + 6)
    seen = []

    def hook(module, args, kwargs):
        seen.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone(), kwargs["position_ids"].clone()))

    handle = lclm.encoder.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        lclm.compress(ids)
    finally:
        handle.remove()
    ((input_ids, mask, positions),) = seen  # both windows in one batch
    extra = [math.ceil(W / N), math.ceil(6 / N)] if pooling == "eos" else [0, 0]
    lengths = [W + extra[0], 6 + extra[1]]
    width = max(lengths)
    assert input_ids.shape == mask.shape == positions.shape == (2, width)
    for row, length in enumerate(lengths):
        pad = width - length
        assert mask[row].tolist() == [0] * pad + [1] * length
        assert positions[row, pad:].tolist() == list(range(length))
        assert input_ids[row, :pad].tolist() == [lclm.encoder.pad_token_id] * pad
    assert input_ids[1, width - lengths[1] : width - lengths[1] + 6].tolist() == ids[W:]


@pytest.mark.parametrize("pooling", POOLINGS)
def test_batch_size_does_not_change_the_latents(tiny_lclm_factory, pooling):
    """Windows encoded one per forward, two per forward or all at once give the same latents."""
    lclm = tiny_lclm_factory(pooling=pooling)
    ids = doc_ids(lclm, 3 * W + 5)  # three full windows and a partial one
    assert lclm.encoder.max_batch_tokens is None and lclm.encoder.batch_tokens() == DEFAULT_BATCH_TOKENS["cpu"]
    batched = lclm.compress(ids)  # all four windows in one forward
    for tokens in (W, 2 * W):
        lclm.encoder.max_batch_tokens = tokens
        torch.testing.assert_close(lclm.compress(ids), batched, atol=1e-5, rtol=0)



@pytest.mark.parametrize("pooling", POOLINGS)
def test_spans_and_single_documents_give_the_same_latents(tiny_lclm_factory, monkeypatch, pooling):
    """encode_spans (training: several spans, all their windows batched together) and the forward
    of one document (inference) run the same window loop: the same latents for each span, equal
    to the bit when both run one window per forward; the forward reports each batch's progress."""
    lclm = tiny_lclm_factory(pooling=pooling)
    ids = doc_ids(lclm, 4 * W)
    spans = [ids[: W + 6], ids[W + 6 : 3 * W + 6], ids[3 * W + 6 : 3 * W + 11]]  # 2, 2 and 1 windows
    with torch.no_grad():
        together = lclm.encoder.encode_spans(spans)  # all five windows in one forward
        for span, latents in zip(spans, together):
            torch.testing.assert_close(latents, lclm.encoder(span), atol=1e-5, rtol=0)
        monkeypatch.setattr(lclm.encoder, "max_batch_tokens", W)  # one window per forward
        seen = []
        single = lclm.encoder(spans[1], progress=lambda done, total: seen.append((done, total)))
        assert torch.equal(lclm.encoder.encode_spans(spans)[1], single)
        assert seen == [(1, 2), (2, 2)]

def replace_token(ids: list[int], index: int) -> list[int]:
    new = next(t for t in range(10, 300) if t != ids[index])
    return ids[:index] + [new] + ids[index + 1 :]


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_mask_keeps_earlier_groups(tiny_lclm_factory, family):
    lclm = tiny_lclm_factory(family=family, mask="causal")
    assert lclm.encoder.model.config.is_causal is True
    assert all(m.is_causal for m in lclm.encoder.model.modules() if hasattr(m, "is_causal"))
    ids = doc_ids(lclm, W)
    a, b = lclm.compress(ids), lclm.compress(replace_token(ids, 13))  # token 13 is in group 3
    torch.testing.assert_close(a[:3], b[:3], atol=1e-6, rtol=0)
    assert not torch.allclose(a[3], b[3], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_bidirectional_mask_lets_later_tokens_change_earlier_groups(tiny_lclm_factory, family):
    lclm = tiny_lclm_factory(family=family, mask="bidirectional")
    assert lclm.encoder.model.config.is_causal is False
    assert not any(m.is_causal for m in lclm.encoder.model.modules() if hasattr(m, "is_causal"))
    ids = doc_ids(lclm, W)
    a, b = lclm.compress(ids), lclm.compress(replace_token(ids, 13))
    for group in range(4):
        assert not torch.allclose(a[group], b[group], atol=1e-4), group
