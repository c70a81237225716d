"""The prefix KV cache (app/engine/kv_cache.py): a follow-up question about the same document prefills
only its own tokens, and its greedy answer is the one a process without reuse gives."""

import json

import pytest
import torch

from app.cli import main
from app.engine.kv_cache import PrefixCache, PrefixEntry, PrefixKey, cache_bytes
from app.engine.memory import release_memory
from app.engine.service import AskRequest, Studio
from app.engine.settings import Settings
from model.errors import OutOfMemory
from model.generation import fork_cache, prefill
from model.prompts import PROMPT_PROFILES, QUESTION_MARK

DOC = ("The quick brown fox jumps over the lazy dog. The vault code is 5521. " * 8).strip()
OTHER_DOC = ("A slow green turtle naps under the old tree. The door number is 802. " * 8).strip()
QUESTIONS = ["What is the vault code?", "Which animal jumps?", "What is the vault code?"]


def make_studio(tmp_path, checkpoint, kv_cache_mb: int = 64) -> Studio:
    return Studio(Settings(data_dir=tmp_path, device="cpu", chunk_tokens=8, kv_cache_mb=kv_cache_mb),
                  checkpoint=str(checkpoint))


def ask(studio: Studio, question: str, mode: str, text: str = DOC, **kwargs) -> dict:
    return list(studio.ask(AskRequest(text, question, method=mode, max_new_tokens=10, **kwargs)))[-1].result


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("mode", ["full", "lclm"])
def test_follow_up_answers_equal_answers_without_reuse(tmp_path, tiny_checkpoint_factory, family, mode):
    checkpoint = tiny_checkpoint_factory(family=family, ratio=4, window=16)
    reusing = make_studio(tmp_path / "a", checkpoint)
    plain = make_studio(tmp_path / "b", checkpoint, kv_cache_mb=0)
    with_reuse = [ask(reusing, q, mode) for q in QUESTIONS]
    without = [ask(plain, q, mode) for q in QUESTIONS]
    assert [r["answer"] for r in with_reuse] == [r["answer"] for r in without]
    assert [r["new_tokens"] for r in with_reuse] == [r["new_tokens"] for r in without]
    first, *follow_ups = with_reuse
    assert first["prefix_reused_positions"] == 0 and first["prefill_positions"] == first["positions"]
    for result in follow_ups:
        assert 0 < result["prefix_reused_positions"] < result["positions"]
        assert result["prefill_positions"] == result["positions"] - result["prefix_reused_positions"]
    for result in without:
        assert result["prefix_reused_positions"] == 0 and result["prefill_positions"] == result["positions"]


def test_the_reused_prefix_is_the_prompt_up_to_the_question(tmp_path, tiny_checkpoint):
    studio = make_studio(tmp_path, tiny_checkpoint)
    ask(studio, QUESTIONS[0], "full")
    result = ask(studio, QUESTIONS[1], "full")
    model = studio.model()
    count = lambda text: len(model.decoder_tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    profile = PROMPT_PROFILES[result["prompt_profile"]]  # the question's layout (paper for a checkpoint directory)
    asked = count(model.chat(profile.question(DOC + QUESTION_MARK, QUESTIONS[1])).split(QUESTION_MARK)[1])
    assert result["prefix_reused_positions"] + asked == pytest.approx(result["positions"], abs=2)
    assert result["prefix_reused_positions"] > count(DOC)  # the whole document is in the prefix


@pytest.mark.slow
def test_reuse_is_per_document_method_and_model(tmp_path, tiny_checkpoint, tiny_checkpoint_factory):
    studio = make_studio(tmp_path, tiny_checkpoint)
    ask(studio, QUESTIONS[0], "lclm")
    assert ask(studio, QUESTIONS[0], "lclm", text=OTHER_DOC)["prefix_reused_positions"] == 0
    assert ask(studio, QUESTIONS[0], "full")["prefix_reused_positions"] == 0
    for other in (dict(ratio=8), dict(ratio=4, pooling="concat")):  # other checkpoints: other ratio, other pooling
        checkpoint = str(tiny_checkpoint_factory(family="qwen3", window=16, **other))
        assert ask(studio, QUESTIONS[0], "lclm", checkpoint=checkpoint)["prefix_reused_positions"] == 0
    assert ask(studio, QUESTIONS[1], "lclm")["prefix_reused_positions"] > 0
    assert ask(studio, QUESTIONS[1], "lclm", text=OTHER_DOC)["prefix_reused_positions"] > 0
    assert len(studio.prefix_cache) == 5


@pytest.mark.slow
def test_no_cache_and_a_zero_budget_never_reuse(tmp_path, tiny_checkpoint):
    studio = make_studio(tmp_path, tiny_checkpoint)
    for _ in range(2):
        assert ask(studio, QUESTIONS[0], "lclm", use_cache=False)["prefix_reused_positions"] == 0
    assert len(studio.prefix_cache) == 0
    off = make_studio(tmp_path / "off", tiny_checkpoint, kv_cache_mb=0)
    for _ in range(2):
        assert ask(off, QUESTIONS[0], "full")["prefix_reused_positions"] == 0
    assert len(off.prefix_cache) == 0


@pytest.mark.slow
def test_expand_answers_report_positions_without_reuse(tmp_path, tiny_checkpoint):
    studio = make_studio(tmp_path, tiny_checkpoint)
    for _ in range(2):
        result = ask(studio, QUESTIONS[0], "expand")
        assert result["prefix_reused_positions"] == 0 and result["prefill_positions"] >= result["positions"]


@pytest.mark.slow
def test_a_follow_up_leaves_the_kept_prefix_as_it_was(tmp_path, tiny_checkpoint):
    studio = make_studio(tmp_path, tiny_checkpoint)
    ask(studio, QUESTIONS[0], "full")
    (entry,) = studio.prefix_cache._entries.values()
    before = [(layer.keys.clone(), layer.values.clone()) for layer in entry.cache.layers]
    ask(studio, QUESTIONS[1], "full")
    ask(studio, QUESTIONS[1], "full")
    after = [(layer.keys, layer.values) for layer in entry.cache.layers]
    assert all(torch.equal(k0, k1) and torch.equal(v0, v1) for (k0, v0), (k1, v1) in zip(before, after))
    assert entry.cache.get_seq_length() == entry.ids.shape[0]


def test_fork_cache_grows_apart_from_its_source(tiny_lclm_factory):
    model = tiny_lclm_factory(family="qwen3", ratio=4, window=16)
    embeds = model.decoder.get_input_embeddings()(torch.arange(5, 17)[None])  # [1, 12, D]
    whole = prefill(model.decoder, embeds)
    head = prefill(model.decoder, embeds[:, :7])
    first = prefill(model.decoder, embeds[:, 7:], fork_cache(head.cache))
    second = prefill(model.decoder, embeds[:, 7:], fork_cache(head.cache))
    assert head.cache.get_seq_length() == 7 and first.positions == second.positions == 12
    assert torch.equal(first.logits, second.logits)
    assert torch.allclose(first.logits, whole.logits, atol=1e-4)


@pytest.mark.slow
def test_running_out_of_memory_drops_the_kept_prefixes_first(tmp_path, tiny_checkpoint, out_of_memory):
    import app.engine.methods

    studio = make_studio(tmp_path, tiny_checkpoint)
    ask(studio, QUESTIONS[0], "full")
    assert len(studio.prefix_cache) == 1
    calls = out_of_memory(app.engine.methods, "prefill", call=1)
    with pytest.raises(OutOfMemory):
        ask(studio, QUESTIONS[1], "full")
    assert calls and len(studio.prefix_cache) == 0 and studio.prefix_cache.bytes == 0
    assert ask(studio, QUESTIONS[1], "full")["prefix_reused_positions"] == 0  # recomputed, then kept again
    assert len(studio.prefix_cache) == 1
    release_memory()
    assert len(studio.prefix_cache) == 0


# ---- the store --------------------------------------------------------------------------------
def entry_of(positions: int) -> PrefixEntry:
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(torch.zeros(1, 1, positions, 4), torch.zeros(1, 1, positions, 4), 0)  # one layer, float32
    return PrefixEntry(torch.arange(positions), cache)


def key(name: str) -> PrefixKey:
    return PrefixKey(name, "ckpt", "full", None, None, "float32", "cpu")


def test_store_drops_the_least_recently_used_beyond_its_bytes():
    one = cache_bytes(entry_of(10).cache)
    assert one == 2 * 10 * 4 * 4
    store = PrefixCache(max_bytes=3 * one)
    for name in "abc":
        assert store.put(key(name), entry_of(10))
    assert store.get(key("a")) is not None  # a is now the most recently used
    store.put(key("d"), entry_of(10))
    assert store.get(key("b")) is None and all(store.get(key(n)) for n in "acd")
    assert store.bytes == 3 * one
    assert not store.put(key("big"), entry_of(40)) and store.get(key("big")) is None
    assert store.put(key("a"), entry_of(20))  # the new a replaces the old, and c (least recent) makes room
    assert store.bytes == 3 * one and len(store) == 2 and store.get(key("c")) is None and store.get(key("d"))
    store.clear()
    assert len(store) == 0 and store.bytes == 0


def test_the_default_budget_and_the_environment(monkeypatch):
    assert 0 < Settings().kv_cache_mb <= 4096
    monkeypatch.setenv("LCLM_STUDIO_KV_CACHE_MB", "0")
    assert Settings.from_env().kv_cache_mb == 0
    with pytest.raises(ValueError):
        Settings(kv_cache_mb=-1)


# ---- the CLI: several questions in one process -------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lclm"])
def test_cli_answers_several_questions_in_order_with_reuse(capsys, tmp_path, tiny_checkpoint, mode):
    path = tmp_path / "doc.txt"
    path.write_text(DOC)
    common = ["ask", str(path), "--checkpoint", str(tiny_checkpoint), "--mode", mode, "--max-new-tokens", "6"]
    assert main([*common, "-q", QUESTIONS[0], "-q", QUESTIONS[1], "--json"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert isinstance(both, list) and [r["question"] for r in both] == QUESTIONS[:2]
    assert both[0]["prefix_reused_positions"] == 0 and both[1]["prefix_reused_positions"] > 0
    for question, result in zip(QUESTIONS[:2], both):
        assert main([*common, "-q", question, "--json"]) == 0
        alone = json.loads(capsys.readouterr().out)
        assert isinstance(alone, dict) and alone["answer"] == result["answer"]


def test_cli_several_questions_as_text(capsys, tmp_path, tiny_checkpoint):
    path = tmp_path / "doc.txt"
    path.write_text(DOC)
    assert main(["ask", str(path), "--checkpoint", str(tiny_checkpoint), "-q", QUESTIONS[0], "-q", QUESTIONS[1],
                 "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.index(f"Q: {QUESTIONS[0]}") < out.index(f"Q: {QUESTIONS[1]}")
    assert "reused" in out


# ---- kvpress presses: the compressed context is kept ------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("press", ["knorm", "snapkv", "streaming_llm"])
def test_press_follow_ups_start_from_the_kept_compressed_context(tmp_path, tiny_checkpoint, press):
    reusing = make_studio(tmp_path / "a", tiny_checkpoint)
    plain = make_studio(tmp_path / "b", tiny_checkpoint, kv_cache_mb=0)
    answers = lambda studio: [list(studio.ask(AskRequest(DOC, q, press, max_new_tokens=8)))[-1].result  # noqa: E731
                              for q in QUESTIONS]
    with_reuse, without = answers(reusing), answers(plain)
    assert [r["answer"] for r in with_reuse] == [r["answer"] for r in without]
    first, *follow_ups = with_reuse
    assert first["prefix_reused_positions"] == 0 and first["prefill_positions"] == first["prefilled_positions"]
    for result, alone in zip(follow_ups, without[1:]):
        # the kept KV pairs of the context come from the cache; only the question is prefilled
        assert result["prefix_reused_positions"] > 0 and result["positions"] == alone["positions"]
        assert result["prefix_reused_positions"] + result["prefill_positions"] == result["positions"]
        assert alone["prefix_reused_positions"] == 0 and alone["prefill_positions"] == alone["prefilled_positions"]
