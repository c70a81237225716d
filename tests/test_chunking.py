"""EXPAND chunks: decoder-token budgets, sentence boundaries, and nothing lost or repeated."""

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from model.chunking import chunk_text
from tests.tiny_models import CORPUS, DECODER_VOCAB, train_tokenizer

TOKENIZER = train_tokenizer(DECODER_VOCAB)
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def count(text: str) -> int:
    return len(TOKENIZER(text, add_special_tokens=False)["input_ids"])


def assert_partition(text: str, chunks) -> None:
    """In order, no overlap, only whitespace between and around chunks, numbers from 1."""
    at = 0
    for number, chunk in enumerate(chunks, start=1):
        assert chunk.number == number
        assert chunk.start_char >= at and not text[at:chunk.start_char].strip()
        assert chunk.text == text[chunk.start_char:chunk.end_char] == chunk.text.strip() != ""
        at = chunk.end_char
    assert not text[at:].strip()
    assert "".join("".join(c.text.split()) for c in chunks) == "".join(text.split())  # nothing lost or repeated


words = st.sampled_from(["fox", "the", "vault", "5521", "a", "magic", "é", "😀", "x=1;", "e.g.", "Mr."])
separators = st.sampled_from([" ", "  ", "\n", "\n\n", ". ", "! ", "? ", ".\n", "", "\t"])
texts = st.one_of(
    st.lists(st.tuples(words, separators), max_size=120).map(lambda parts: "".join(w + s for w, s in parts)),
    st.text(max_size=400),
)


@pytest.mark.slow
@PROPERTY
@given(texts, st.integers(4, 64))
@example("word " * 300, 8)  # no sentence end: cut every C tokens
@example(CORPUS, 16)
@example("😀" * 50, 4)
def test_chunks_cover_the_text_in_order_each_within_the_budget(text, budget):
    chunks = chunk_text(text, TOKENIZER, budget)
    assert_partition(text, chunks)
    for chunk in chunks:
        assert chunk.tokens == count(chunk.text)
        assert chunk.tokens <= budget or len(TOKENIZER(chunk.text, add_special_tokens=False,
                                                       return_offsets_mapping=True)["offset_mapping"]) == 1
    assert bool(chunks) == bool(text.strip())


def test_a_short_text_is_one_chunk_and_sentences_stay_whole():
    assert [c.text for c in chunk_text("  One. Two!  ", TOKENIZER, 256)] == ["One. Two!"]
    sentences = [f"The code of vault {i} is {5521 + i}." for i in range(40)]
    chunks = chunk_text(" ".join(sentences), TOKENIZER, 32)
    assert len(chunks) > 3
    for chunk, after in zip(chunks, chunks[1:]):
        assert chunk.text.endswith(".") and after.text.startswith("The code")  # whole sentences only
        next_sentence = after.text.split(". ")[0] + "."
        assert count(chunk.text + " " + next_sentence) > 32  # packed greedily: the next one did not fit


def test_a_long_unpunctuated_text_is_cut_at_the_budget():
    text = " ".join(f"line{i} value={i * 7}" for i in range(200))
    chunks = chunk_text(text, TOKENIZER, 16)
    assert len(chunks) >= count(text) // 16
    assert all(c.tokens <= 16 for c in chunks)
    assert_partition(text, chunks)
    assert max(c.tokens for c in chunks) == 16  # cut at the budget, not before


def test_empty_text_and_bad_budget():
    assert chunk_text(" \n\t ", TOKENIZER, 8) == []
    with pytest.raises(ValueError):
        chunk_text("text", TOKENIZER, 0)
