"""The studio services behind the CLI and the UI, on tiny random checkpoints."""

import pytest
import torch

import app.engine.methods
from app.engine.measure import kv_cache_bytes
from app.engine.service import AskRequest, Studio
from app.engine.settings import Settings
from model.agent import ACTIONS
from model.errors import UserError
from model.fidelity import token_accuracy
from model.prompts import PROMPT_PROFILES, memory_region

DOC = ("The quick brown fox jumps over the lazy dog. The vault code is 5521. " * 10).strip()
QUESTION = "What is the vault code?"


@pytest.fixture
def studio(tmp_path, tiny_checkpoint):
    return Studio(Settings(data_dir=tmp_path, device="cpu", chunk_tokens=8), checkpoint=str(tiny_checkpoint))


def done(events):
    events = list(events)
    assert [e.kind for e in events].count("done") == 1 and events[-1].kind == "done"
    return events, events[-1].result


def test_streamed_tokens_make_the_answer(studio):
    events, result = done(studio.ask(AskRequest(DOC, QUESTION, method="lclm", max_new_tokens=12)))
    assert "".join(e.text for e in events if e.kind == "token").strip() == result["answer"]
    assert result["new_tokens"] >= 1


@pytest.mark.slow
def test_lclm_prefills_fewer_positions_than_full_context(studio):
    _, full = done(studio.ask(AskRequest(DOC, QUESTION, method="full", max_new_tokens=2)))
    _, lclm = done(studio.ask(AskRequest(DOC, QUESTION, method="lclm", max_new_tokens=2)))
    model = studio.model()
    profile = PROMPT_PROFILES[lclm["prompt_profile"]]
    assert lclm["prompt_profile"] == full["prompt_profile"] == "paper"  # the default for a checkpoint directory
    with_placeholders = model.chat(profile.question(memory_region(lclm["latents"]), QUESTION))
    prompt_only = model.chat(profile.question("", QUESTION))
    count = lambda text: len(model.decoder_tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert lclm["positions"] == count(with_placeholders)
    assert abs(lclm["positions"] - (count(prompt_only) + lclm["latents"] + 2)) <= 2  # + start/end tags
    assert lclm["positions"] < full["positions"]
    assert lclm["kv_cache_bytes"] < full["kv_cache_bytes"]


def test_measurement_fields_are_consistent(studio):
    _, r = done(studio.ask(AskRequest(DOC, QUESTION, method="lclm", max_new_tokens=4, use_cache=False)))
    assert r["compress_ms"] > 0 and r["prefill_ms"] > 0 and r["first_token_ms"] >= 0
    parts = r["compress_ms"] + r["prefill_ms"] + r["first_token_ms"]
    assert r["ttft_ms"] >= parts - 0.01
    assert r["other_ms"] == pytest.approx(r["ttft_ms"] - parts, abs=0.01)
    model = studio.model()
    assert r["kv_cache_bytes"] == kv_cache_bytes(model.decoder.config, r["positions"], torch.float32)
    assert r["peak_mem_bytes"] > 0


def test_kv_cache_bytes_formula():
    class Config:
        num_hidden_layers, num_key_value_heads, head_dim, num_attention_heads, hidden_size = 36, 8, 128, 32, 2560

    # the paper's decoder shape: 36 layers x 8 KV heads x 128 dims, bf16
    assert kv_cache_bytes(Config, 1000, torch.bfloat16) == 2 * 36 * 8 * 128 * 1000 * 2


def test_cache_hit_then_corruption_is_rebuilt(studio):
    first = studio.compress(DOC)
    second = studio.compress(DOC)
    assert first.result.cached is False and second.result.cached is True and second.result.compress_ms == 0
    assert torch.equal(first.latents, second.latents)
    # corrupt every stored entry: the next request misses, recomputes the same latents, and re-caches
    raw = studio.store.cache._cache
    for key in list(raw.iterkeys()):
        raw.set(key, b"not safetensors")
    third = studio.compress(DOC)
    assert third.result.cached is False and torch.equal(third.latents, first.latents)
    assert studio.compress(DOC).result.cached is True


@pytest.mark.slow
def test_expand_reads_each_chunk_compressed_on_its_own(studio, monkeypatch):
    seen = []
    run = app.engine.methods.ExpandAgent.run

    def recording(self, question, chunk_latents, chunk_texts, generate, layout=None):
        seen.append((list(chunk_latents), list(chunk_texts)))
        return (yield from run(self, question, chunk_latents, chunk_texts, generate, layout))

    monkeypatch.setattr(app.engine.methods.ExpandAgent, "run", recording)
    events, result = done(studio.ask(AskRequest(DOC, QUESTION, method="expand", max_new_tokens=4)))
    model = studio.model()
    chunks = studio.store.chunks(model, DOC)
    latents, texts = seen[0]
    assert texts == [c.text for c in chunks] and len(chunks) > 1
    for chunk, region in zip(chunks, latents):  # exactly the latents of that chunk's text compressed alone
        alone = model.compress(model.encoder_tokenizer(chunk.text, add_special_tokens=False)["input_ids"])
        assert torch.equal(region, alone)
    assert result["latents"] == sum(int(r.shape[0]) for r in latents)
    rounds = [e.round for e in events if e.kind == "round"]
    assert rounds == result["rounds"] and rounds[-1]["action"] in ("answer", "forced")
    assert all(r["action"] in ACTIONS and r["prompt_tokens"] > 0 for r in rounds)
    assert len(rounds) <= studio.settings.max_expand_rounds + 1  # the decision rounds and one forced round
    assert result["prompt_profile"] == "paper" and rounds[0]["forced"] is None
    assert [c["index"] for c in result["chunks"]] == list(range(1, len(chunks) + 1))
    assert all(c["tokens"] <= 8 and DOC[c["start_char"]:c["end_char"]] == chunk.text
               for c, chunk in zip(result["chunks"], chunks))
    assert result["expanded"] == sorted({n for r in rounds for n in r["expanded"]})
    assert all(1 <= n <= len(chunks) for n in result["expanded"])


@pytest.mark.slow
def test_expand_encodes_a_document_once_then_reads_the_cache(studio, monkeypatch):
    _, first = done(studio.ask(AskRequest(DOC, QUESTION, method="expand", max_new_tokens=2)))
    model = studio.model()
    calls = []
    compress_group = model.compress_group
    monkeypatch.setattr(model, "compress_group", lambda windows: calls.append(1) or compress_group(windows))
    _, second = done(studio.ask(AskRequest(DOC, "Another question?", method="expand", max_new_tokens=2)))
    assert first["cached"] is False and first["compress_ms"] > 0
    assert second["cached"] is True and second["compress_ms"] == 0 and calls == []
    # the whole document (plain LCLM mode): its windows are cached by their own token ids, so only
    # those no chunk shares are encoded
    whole = studio.compress(DOC).result
    assert whole.cached is False and calls and whole.cached_windows < whole.windows


@pytest.mark.slow
def test_expand_with_the_studio_profile_prefills_the_first_reply(studio):
    _, result = done(studio.ask(AskRequest(DOC, QUESTION, method="expand", max_new_tokens=2, prompt_profile="studio")))
    assert result["prompt_profile"] == "studio"
    assert result["rounds"][0]["forced"] == "EXPAND:" and result["rounds"][0]["raw_output"].startswith("EXPAND:")
    with pytest.raises(UserError, match="prompt profile must be one of paper, studio"):
        list(studio.ask(AskRequest(DOC, QUESTION, method="expand", prompt_profile="mine")))


def test_reconstruct_accuracy_of_a_perfect_copy_is_one():
    assert token_accuracy([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert token_accuracy([1, 2, 3, 4], [1, 9, 3, 4, 5]) == 0.75
    assert token_accuracy([1, 2], []) == 0.0


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "summarise"}, "mode must be one of"),
    ({"ratio": 5}, "ratio must be one of 4, 8, 16"),
    ({"pooling": "max"}, "pooling must be one of mean, concat, eos"),
    ({"max_new_tokens": -1}, "max new tokens must be at least 1"),
])
def test_invalid_choices_are_user_errors(studio, kwargs, message):
    with pytest.raises(UserError, match=message):
        list(studio.ask(AskRequest(DOC, QUESTION, **kwargs)))


def test_prompt_longer_than_the_decoder_is_refused(studio):
    model = studio.model()
    limit = model.decoder.config.max_position_embeddings
    long_doc = " ".join(["word"] * (limit * 2))
    with pytest.raises(UserError, match="decoder positions"):
        list(studio.ask(AskRequest(long_doc, QUESTION, method="full", max_new_tokens=2)))


def test_models_are_loaded_once_per_process(studio):
    assert studio.model() is studio.model()
