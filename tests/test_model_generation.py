"""Generation: greedy determinism, stop ids, max_new_tokens, sampling, streaming detokenization."""

import pytest
import torch

from model.generation import (
    REFERENCE_SAMPLING,
    Sampling,
    StreamingDetokenizer,
    decode,
    prefill,
    stop_token_ids,
)
from model.prompts import memory_region
from tests.tiny_models import CORPUS

FAMILIES = ["qwen3", "llama"]


def prompt_embeds(lclm) -> torch.Tensor:
    latents = lclm.compress(lclm.tokenize_document(CORPUS[:200]).ids)
    prompt = lclm.chat(f"{memory_region(latents.shape[0])}\nWhat is the vault code?")
    return lclm.prepare(prompt, [latents]).inputs_embeds


def generate(lclm, max_new_tokens=10, stop_ids=frozenset(), sampling=Sampling()) -> list[int]:
    state = prefill(lclm.decoder, prompt_embeds(lclm))
    return list(decode(lclm.decoder, state, max_new_tokens, set(stop_ids), sampling))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_is_deterministic_and_matches_a_full_forward(tiny_lclm_factory, family):
    lclm = tiny_lclm_factory(family=family)
    ids = generate(lclm, 10)
    assert ids == generate(lclm, 10)
    assert len(ids) == 10
    assert len(set(ids)) > 1  # the tiny model does not just repeat one token
    # each token is the argmax of a full, uncached forward over the prompt and the tokens so far
    embeds = prompt_embeds(lclm)
    embedding = lclm.decoder.get_input_embeddings()
    with torch.inference_mode():
        for step, token in enumerate(ids):
            tail = embedding(torch.tensor([ids[:step]], dtype=torch.long))
            logits = lclm.decoder(inputs_embeds=torch.cat([embeds, tail], dim=1)).logits[0, -1]
            assert int(logits.argmax()) == token, step


def test_prefill_state(tiny_lclm_factory):
    lclm = tiny_lclm_factory()
    embeds = prompt_embeds(lclm)
    state = prefill(lclm.decoder, embeds)
    assert state.positions == embeds.shape[1]
    assert state.logits.shape == (lclm.decoder.config.vocab_size,) and state.logits.dtype == torch.float32
    assert state.cache.get_seq_length() == embeds.shape[1]


@pytest.mark.slow
@pytest.mark.parametrize("max_new_tokens", [0, 1, 3, 7])
def test_max_new_tokens_is_respected(tiny_lclm_factory, max_new_tokens):
    lclm = tiny_lclm_factory()
    full = generate(lclm, 12)
    assert generate(lclm, max_new_tokens) == full[:max_new_tokens]


@pytest.mark.slow
def test_stops_at_a_stop_id(tiny_lclm_factory):
    lclm = tiny_lclm_factory()
    full = generate(lclm, 12)
    stop = full[4]
    cut = full.index(stop)
    assert generate(lclm, 12, stop_ids={stop}) == full[:cut]
    assert generate(lclm, 12, stop_ids={full[0]}) == []
    never = next(t for t in range(len(lclm.decoder_tokenizer)) if t not in full)
    assert generate(lclm, 12, stop_ids={never}) == full


def test_stop_token_ids_include_eos_and_im_end(tiny_lclm_factory):
    lclm = tiny_lclm_factory()
    tok = lclm.decoder_tokenizer
    stops = stop_token_ids(tok, lclm.decoder)
    assert tok.eos_token_id in stops and tok.convert_tokens_to_ids("<|im_end|>") in stops


@pytest.mark.slow
def test_sampling_is_reproducible_per_seed(tiny_lclm_factory):
    lclm = tiny_lclm_factory()
    hot = Sampling(temperature=1.5, seed=3)
    assert generate(lclm, 12, sampling=hot) == generate(lclm, 12, sampling=hot)
    runs = {tuple(generate(lclm, 12, sampling=Sampling(temperature=1.5, seed=s))) for s in range(4)}
    assert len(runs) > 1
    ref = generate(lclm, 6, sampling=REFERENCE_SAMPLING)
    assert ref == generate(lclm, 6, sampling=REFERENCE_SAMPLING) and len(ref) <= 6


def test_top_k_one_is_greedy(tiny_lclm_factory):
    lclm = tiny_lclm_factory()
    assert generate(lclm, 8, sampling=Sampling(temperature=1.0, top_k=1, seed=5)) == generate(lclm, 8)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(repetition_penalty=0)])
def test_invalid_sampling_settings(bad):
    with pytest.raises(ValueError):
        Sampling(**bad)


def stream(tokenizer, ids) -> tuple[str, str]:
    """(concatenated push() pieces, flush()) of one stream."""
    detok = StreamingDetokenizer(tokenizer)
    pieces = "".join(detok.push(i) for i in ids)
    return pieces, detok.flush()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("count", [1, 5, 12, 24])
def test_streaming_detokenizer_of_generated_ids(tiny_lclm_factory, family, count):
    lclm = tiny_lclm_factory(family=family)
    tok = lclm.decoder_tokenizer
    ids = generate(lclm, 24)[:count]
    full = tok.decode(ids, skip_special_tokens=True)
    pieces, tail = stream(tok, ids)
    assert pieces + tail == full
    # push() holds back only an incomplete trailing character, which flush() gives out
    assert tail == "" or (set(tail) == {"\ufffd"} and not pieces.endswith("\ufffd"))


def test_streaming_detokenizer_holds_back_a_split_character(tiny_lclm_factory):
    tok = tiny_lclm_factory().decoder_tokenizer
    ids = tok("snow \u2603 man", add_special_tokens=False)["input_ids"]
    byte_pieces = [i for i in ids if tok.decode([i]) == "\ufffd"]
    assert len(byte_pieces) >= 2  # the tiny vocabulary spells the snowman in byte tokens
    detok = StreamingDetokenizer(tok)
    out = []
    for i in ids:
        out.append(detok.push(i))
        assert "\ufffd" not in out[-1]
    assert "".join(out) == "snow \u2603 man" and detok.flush() == ""
    cut = ids[: ids.index(byte_pieces[0]) + 1]  # stream cut inside the character
    pieces, tail = stream(tok, cut)
    assert pieces == "snow " and tail == "\ufffd"


@pytest.mark.parametrize("text", [
    "The vault code is 5521.",
    "café crème, naïve façade — 日本語のテキスト 🙂 done",
    "<|im_start|>user\nhi<|im_end|> and <|memory|> tags",
    "  leading spaces and\n\nnew lines\t",
])
def test_streaming_detokenizer_never_splits_characters(tiny_lclm_factory, text):
    tok = tiny_lclm_factory().decoder_tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = StreamingDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    if "<|" not in text:
        assert "".join(pieces) == text
