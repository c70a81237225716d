"""Training data without a model: synthetic task generators, span planning, the corpus
(licence filtering, deterministic split, shards and the packed file) and quality metrics."""

import random
import re

import numpy as np
import pytest

from bench.quality.metrics import bleu, rouge_l
from model.training.data.corpus import (
    COMMON_LICENSES,
    CorpusDocument,
    FileTreeSource,
    is_licence_file,
    split_of,
    strip_licence_text,
)
from model.training.data.prepare import prepare
from model.training.data.shards import load_corpus, pack
from model.training.data.synthetic import (
    TASKS,
    Haystack,
    TaskExample,
    eval_seed,
    expand_transcript,
    make_task,
    score,
    train_seed,
)
from model.training.examples import plan_spans
from tests.tiny_models import TextSource, corpus_rotations, train_tokenizer

WORDS = ("river", "stone", "lamp", "garden", "window", "letter", "market", "bridge", "winter", "song")


def filler_text(sentences: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(
        f"The {rng.choice(WORDS)} near the {rng.choice(WORDS)} was {rng.choice(WORDS)} number {i} of the story."
        for i in range(sentences))


@pytest.fixture(scope="module")
def haystack():
    return Haystack(filler_text(), lambda text: len(text.split()))  # whitespace words as tokens


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.77, 1.0])
def test_answers_occur_once_at_the_stated_depth(task, depth, haystack):
    example = make_task(task, seed=eval_seed(task, depth), haystack=haystack, context_tokens=300, depth=depth)
    assert example.question and example.answers
    for text in example.unique:
        assert example.context.count(text) == 1, (task, text)
    for answer in example.answers:
        assert example.context.count(answer) >= 1
    # each answer offset points at its answer; the asked fact (the first) sits at the stated depth
    for answer, offset in zip(example.answers, example.answer_offsets):
        assert example.context[offset:offset + len(answer)] == answer
    # depth within the filler: the inserted facts themselves do not count
    facts = re.compile(r"(The special magic number for|VAR) [^.]*\.\s?")
    before = facts.sub("", example.context[:example.answer_offsets[0]])
    measured = len(before) / len(facts.sub("", example.context))
    tolerance = {"sentence_qa": 0.1, "kv_retrieval": 0.12}.get(task, 0.05)  # kv: one pair is 1/10 of the context
    assert abs(measured - depth) < tolerance, (task, example.depth, measured)
    assert len(example.context.split()) == pytest.approx(300, rel=0.3) or task == "kv_retrieval"


def test_task_examples_are_deterministic_and_seeds_never_shared(haystack):
    a = make_task("niah_multikey", 7, haystack, 200)
    b = make_task("niah_multikey", 7, haystack, 200)
    assert a == b
    train = {train_seed(0, step) for step in range(2000)}
    evaluation = {eval_seed(task, n, i) for task in TASKS for n in (512, 1024, 4096) for i in range(50)}
    assert not train & evaluation


def test_score_is_the_share_of_answers_found():
    example = TaskExample("niah_multivalue", "ctx", "q", ["111", "222"], 0.5, [0, 0])
    assert score(example, "The numbers are 111 and 222.") == 1.0
    assert score(example, "Only 222") == 0.5
    assert score(example, "none") == 0.0


def test_expand_transcript_expands_the_chunk_with_the_answer_then_answers(haystack):
    example = make_task("niah_single", 3, haystack, 300, depth=0.6)
    spans = [(0, 400), (400, 900), (900, len(example.context) + 1)]
    where = next(i for i, (a, b) in enumerate(spans) if a <= example.answer_offsets[0] < b)
    first, second = expand_transcript(example, spans)
    assert first.expanded == [] and first.reply == f"EXPAND: {where}"
    assert second.expanded == [where] and second.reply == "ANSWER: " + example.answers[0]


@pytest.mark.parametrize("total", [1, 30, 257, 2048])
def test_planned_spans_cover_the_sequence_and_alternate(total):
    rng = np.random.default_rng(total)
    spans = plan_spans(total, rng, memory_fraction=0.5, span_tokens=(16, 64))
    assert sum(n for _, n in spans) == total
    assert all(a[0] != b[0] for a, b in zip(spans, spans[1:]))
    assert any(kind == "memory" for kind, _ in spans)
    if total >= 2048:
        memory = sum(n for k, n in spans if k == "memory") / total
        assert 0.3 < memory < 0.7


def test_licence_text_is_never_read():
    assert is_licence_file(COMMON_LICENSES / "GPL-3")
    assert is_licence_file(COMMON_LICENSES / "Apache-2.0")
    for name in ("LICENSE", "COPYING", "license-rules.rst.gz", "copyright", "LICENSE.txt"):
        assert is_licence_file(COMMON_LICENSES.parent / "doc" / "pkg" / name)
    assert not is_licence_file(COMMON_LICENSES.parent / "doc" / "pkg" / "tutorial.rst.txt")
    source = FileTreeSource("x", "test", [str(COMMON_LICENSES)], ["*"])
    assert source.files() == []
    text = "Useful intro.\n\nThis program is free software; you can redistribute it.\n\nMore prose."
    assert strip_licence_text(text) == "Useful intro.\n\nMore prose."


def test_prepare_shards_split_and_pack(tmp_path):
    tokenizer = train_tokenizer(300)
    manifest = prepare([TextSource(corpus_rotations(3))], tokenizer, tmp_path / "shards", max_tokens_per_source=10_000,
                       validation_permille=300, shard_tokens=2_000, quiet=True)
    assert manifest["total_tokens"] == sum(manifest["splits"][s]["tokens"] for s in ("train", "validation"))
    assert manifest["splits"]["validation"]["tokens"] > 0 and len(manifest["splits"]["train"]["files"]) > 1
    assert manifest["sources"][0]["licence"] == "test"
    # the split is a function of the document's identity only
    doc = CorpusDocument("test-text", "doc3", "")
    assert split_of(doc, 300) == split_of(CorpusDocument("test-text", "doc3", "other text"), 300)
    info = pack(tmp_path / "shards", tmp_path / "corpus.safetensors.xz")
    assert info["bytes"] < info["raw_bytes"]
    a, b = load_corpus(tmp_path / "shards"), load_corpus(tmp_path / "corpus.safetensors.xz")
    for split in ("train", "validation"):
        assert np.array_equal(a[split].tokens, b[split].tokens)
        assert np.array_equal(a[split].doc_offsets, b[split].doc_offsets)
    assert a.manifest == b.manifest
    a.check_tokenizer(tokenizer)
    with pytest.raises(ValueError, match="tokenized with"):
        a.check_tokenizer(train_tokenizer(280))
    # a window never crosses a document boundary
    rng = np.random.default_rng(0)
    for _ in range(20):
        window = a["train"].window(rng, 50)
        assert 0 < len(window) <= 50
    with pytest.raises(ValueError, match="over the"):
        pack(tmp_path / "shards", tmp_path / "small.safetensors.xz", max_bytes=100)


def test_rouge_l_and_bleu():
    assert rouge_l("a b c d", "a b c d") == 1.0
    assert rouge_l("a b c d", "x y") == 0.0
    assert rouge_l("a b c d", "a c d") == pytest.approx(2 * (3 / 3) * (3 / 4) / (1 + 3 / 4))
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu(["the cat sat on the mat"], ["dog"]) < 10
