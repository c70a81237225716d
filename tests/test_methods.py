"""The method registry (app/engine/methods.py) and the press registry (model/presses.py): every entry
answers through the studio, and every list of choices (CLI, Ask tab, both benchmarks) is the
registry itself, so adding a press is one line in model/presses.py."""

import pytest
import torch

from app.cli import build_parser
from app.engine.latent_store import DocumentIds
from app.engine.methods import METHODS, PRESS_METHODS, Request, prompt_parts
from app.engine.service import AskRequest, Studio
from app.engine.settings import Settings
from bench.quality.suite import methods as quality_methods
from bench.speed.methods import TIMED_METHODS as SPEED_METHODS
from model.generation import decode, prefill
from model.presses import PRESSES
from views.ask import kvpress_choices

DOC = "The vault code is 5521. The grass is green and the sky is blue. " * 8
QUESTION = "What is the vault code?"


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_checkpoint_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("home"), device="cpu", chunk_tokens=32)
    return Studio(settings, checkpoint=str(tiny_checkpoint_factory(family="qwen3", ratio=4, window=16)))


def test_every_method_says_what_it_is():
    for name, method in METHODS.items():
        assert method.name == name and method.label and method.prepares
    assert {"full", "lclm", "expand"} <= set(METHODS)
    assert PRESS_METHODS == list(PRESSES)


def test_every_choice_list_is_the_registry():
    press_action = next(a for a in build_parser()._subparsers._group_actions[0].choices["ask"]._actions
                        if a.dest == "press")
    assert all(name in press_action.help for name in PRESSES)
    assert [value for _, value in kvpress_choices()][1:] == list(PRESSES)
    assert set(PRESSES) <= set(SPEED_METHODS)
    assert {m.kind for m in quality_methods([4], ["mean"], list(PRESSES))} == {"full", "lclm", "expand", *PRESSES}
    with pytest.raises(ValueError, match="unknown presses"):
        quality_methods([4], ["mean"], ["nope"])


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_answers_one_request(studio, name):
    if name == "kvzip":
        pytest.skip("kvpress's KVzip cannot mask the keys of a tiny checkpoint; tests/test_bench_speed.py runs it "
                    "on the tiny random Qwen3 pair")
    events = list(studio.ask(AskRequest(DOC, QUESTION, name, max_new_tokens=3)))
    result = events[-1].result
    assert events[-1].kind == "done" and events[-1].measurement.ttft_ms == pytest.approx(result["ttft_ms"], abs=1e-3)
    assert result["ttft_ms"] > 0
    assert result["mode"] == name and result["method"] == METHODS[name].label
    assert result["positions"] > 0 and result["kv_cache_bytes"] > 0 and result["new_tokens"] >= 0
    assert result["ttft_ms"] >= result["compress_ms"] + result["prefill_ms"]
    if name in PRESSES:
        assert result["positions"] < result["prefilled_positions"] or not PRESSES[name].uses_ratio
    if METHODS[name].reads_latents:
        assert result["latents"] > 0 and result["ratio"] == 4


def test_full_context_reads_the_prompt_cut_around_the_document(studio):
    """The methods share one prompt layout: the decoder ids before the document, the document's
    ids, the ids after it; full context's positions are exactly those."""
    variant = studio.variant()
    before, after = prompt_parts(variant.model, variant.profile, QUESTION)
    document = studio.request(DOC, QUESTION, variant, 2).document
    result = list(studio.ask(AskRequest(DOC, QUESTION, "full", max_new_tokens=2, use_cache=False)))[-1].result
    assert result["positions"] == len(before) + len(document.decoder_ids) + len(after)
    lclm = list(studio.ask(AskRequest(DOC, QUESTION, "lclm", max_new_tokens=2, use_cache=False)))[-1].result
    assert lclm["positions"] == len(before) + lclm["latents"] + 2 + len(after)  # + the memory start and end tags


def test_a_document_of_ids_answers_as_its_text(studio):
    """The benchmarks' documents are token ids: the same ids give the same answer and positions."""
    variant = studio.variant()
    from_text = studio.request(DOC, QUESTION, variant, 4, use_cache=False)
    ids = DocumentIds.from_ids(from_text.document.encoder_ids, from_text.document.decoder_ids)
    assert ids.key != from_text.document.key
    for name in ("full", "lclm", "snapkv"):
        by_text = list(studio.run(name, from_text))[-1].result
        by_ids = list(studio.run(name, Request(ids, QUESTION, variant, 4, latent_cache=False,
                                               prefix_cache=False)))[-1].result
        assert (by_ids["answer"], by_ids["positions"]) == (by_text["answer"], by_text["positions"])
    with pytest.raises(Exception, match="only token ids"):
        list(studio.run("expand", Request(ids, QUESTION, variant, 4)))


def test_decode_continues_from_the_prompt_position_not_the_cache_length(studio):
    """A press's cache holds fewer entries than the positions it covers: decode must place each
    new token after the prompt's last position (what `PrefillState.positions` says)."""
    import copy

    decoder = studio.model().decoder
    with torch.inference_mode():
        embeds = decoder.get_input_embeddings()(torch.arange(1, 9)[None])  # [1, 8, D]
        state = prefill(decoder, embeds, start=100)  # 8 entries standing at positions 100..107
        assert state.positions == 108 and state.cache.get_seq_length() == 8
        reference, cache, logits = [], copy.deepcopy(state.cache), state.logits
        for step in range(6):  # greedy, each token at 108 + step, written out by hand
            token = int(logits.argmax())
            reference.append(token)
            out = decoder(input_ids=torch.tensor([[token]]), past_key_values=cache,
                          position_ids=torch.tensor([[108 + step]]))
            logits, cache = out.logits[0, -1].float(), out.past_key_values
        decoded = list(decode(decoder, state, 6, stop_ids=set()))
    assert decoded == reference


def test_full_context_and_the_presses_read_text_with_a_decoder_loras_base(tmp_path_factory, tiny_checkpoint_factory,
                                                                          monkeypatch):
    """A checkpoint whose decoder is a LoRA (trained to read latents) reads latents with it, while
    full context and the presses read the document with the LoRA's base model: they answer as the
    checkpoint with the plain base decoder does, which the merged decoder does not."""
    home = tmp_path_factory.mktemp("lora-home")
    lora = Studio(Settings(data_dir=home / "a", device="cpu", chunk_tokens=32),
                  checkpoint=str(tiny_checkpoint_factory(family="qwen3", ratio=4, window=16, lora=True)))
    plain = Studio(Settings(data_dir=home / "b", device="cpu", chunk_tokens=32),
                   checkpoint=str(tiny_checkpoint_factory(family="qwen3", ratio=4, window=16)))
    variant = lora.variant()
    assert variant.reads_text_with_base and not plain.variant().reads_text_with_base
    assert not lora.models._base_decoders  # loaded on first use
    import app.engine.methods

    loaded_at_meter = []

    class Recording(app.engine.methods.Meter):
        def __enter__(self):
            loaded_at_meter.append(len(lora.models._base_decoders))
            return super().__enter__()

    monkeypatch.setattr(app.engine.methods, "Meter", Recording)
    list(lora.ask(AskRequest(DOC, QUESTION, "full", max_new_tokens=1)))
    monkeypatch.undo()
    assert loaded_at_meter == [1]  # before the clocks and the memory readout start
    assert variant.text_decoder is not variant.model.decoder
    assert variant.text_decoder is lora.variant().text_decoder  # loaded once

    def answer(studio, mode, use_cache=False):
        return list(studio.ask(AskRequest(DOC, QUESTION, mode, max_new_tokens=8, use_cache=use_cache)))[-1].result

    for mode in ("full", "snapkv"):
        by_lora, by_plain = answer(lora, mode), answer(plain, mode)
        assert by_lora["base_decoder"] and not by_plain["base_decoder"]
        assert by_lora["answer"] and by_lora["new_tokens"] == 8
        assert (by_lora["answer"], by_lora["positions"]) == (by_plain["answer"], by_plain["positions"])
    assert answer(lora, "full", use_cache=True)["answer"] == answer(plain, "full")["answer"]  # prefix reuse too
    # the merged decoder reads the same prompt differently (so the checks above can fail)
    before, after = prompt_parts(variant.model, variant.profile, QUESTION)
    ids = torch.tensor([before + lora.request(DOC, QUESTION, variant, 2).document.decoder_ids + after])
    with torch.inference_mode():
        merged = [list(decode(d, prefill(d, d.get_input_embeddings()(ids)), 8, stop_ids=set()))
                  for d in (variant.model.decoder, variant.text_decoder)]
    assert merged[0] != merged[1]
    # the LCLM reads its latents with the LoRA decoder: its answer differs from the plain checkpoint's
    assert answer(lora, "lclm")["answer"] != answer(plain, "lclm")["answer"]


# ---- how an answer ended, said to the reader --------------------------------------------------
def test_the_repetition_guard_stops_at_a_repeated_sentence_only():
    from model.generation import RepetitionGuard

    guard = RepetitionGuard()
    assert not guard.repeated("The user sync is a daemon. It runs hourly.")
    assert not guard.repeated("The user sync is a daemon. It runs hourly. Ok. Ok. Ok.")  # short ones do not count
    assert guard.repeated("The user sync is a daemon. It runs hourly. Ok. Ok. Ok. the user  sync is a DAEMON.")
    unfinished = RepetitionGuard()
    assert not unfinished.repeated("The user sync is a daemon. The user sync is a daemon")  # not complete yet


def scripted_reply(studio, monkeypatch, text: str, stop_at_repeat: bool, max_new_tokens: int = 64):
    """`reply` over a decode that yields the ids of `text` (then stops), as a method runs it."""
    import app.engine.methods as methods
    from app.engine.measure import Meter

    variant = studio.variant()
    model = variant.model
    ids = model.decoder_tokenizer(text, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(methods, "decode", lambda decoder, state, limit, stops, sampling: iter(ids[:limit]))
    request = Request(DocumentIds.from_ids([1, 2, 3]), QUESTION, variant, max_new_tokens,
                      stop_at_repeat=stop_at_repeat)
    with Meter(model.device, model.decoder.config, model.dtype) as meter:
        generator = methods.reply(request, None, meter, 0.0, model.decoder)
        while True:
            try:
                next(generator)
            except StopIteration as stop:
                return stop.value, len(ids)


def test_a_looping_reply_stops_at_its_repeat_and_says_so(studio, monkeypatch):
    from app.engine.methods import reply_warnings

    loop = "The user sync is a daemon. " * 4
    replied, _ = scripted_reply(studio, monkeypatch, loop, stop_at_repeat=True, max_new_tokens=1000)
    assert replied.stopped == "repeat" and replied.text.count("daemon") == 2
    assert any("repeated sentence" in w for w in reply_warnings(replied))
    plain, count = scripted_reply(studio, monkeypatch, loop, stop_at_repeat=False, max_new_tokens=1000)  # plain greedy
    assert plain.stopped == "end" and plain.text.count("daemon") == 4 and plain.tokens == count
    cut, _ = scripted_reply(studio, monkeypatch, loop, stop_at_repeat=False, max_new_tokens=3)
    assert cut.stopped == "limit" and cut.tokens == 3


def test_an_empty_answer_says_so(studio, monkeypatch):
    from app.engine.methods import reply_warnings

    replied, _ = scripted_reply(studio, monkeypatch, "", stop_at_repeat=True)
    assert replied.text == "" and replied.stopped == "end"
    assert reply_warnings(replied) == ["the answer is empty: the decoder ended its reply after 0 token(s)"]


def test_expand_rounds_that_read_nothing_and_a_forced_answer_are_named():
    from app.engine.methods import expand_warnings

    rounds = [{"number": 1, "action": "expand", "expanded": [], "ignored": ["9: no such chunk (1-3)"]},
              {"number": 2, "action": "forced", "expanded": [], "ignored": []}]
    assert expand_warnings(rounds) == [
        "round 1 asked to expand but named no chunk that could be read (9: no such chunk (1-3))",
        "no round answered: the answer is the reply to the forced final round 2"]
    assert expand_warnings([{"number": 1, "action": "expand", "expanded": [2], "ignored": []},
                            {"number": 2, "action": "answer", "expanded": [], "ignored": []}]) == []


def test_every_result_says_how_it_ended(studio):
    for name in ("full", "lclm", "expand"):
        result = list(studio.ask(AskRequest(DOC, QUESTION, name, max_new_tokens=3)))[-1].result
        assert result["stopped"] in ("end", "limit", "repeat") and isinstance(result["warnings"], list)
        if name == "expand":
            assert result["answer_ttft_ms"] >= result["ttft_ms"] > 0
            forced = result["rounds"][-1]["action"] == "forced"
            assert forced == any("forced final round" in w for w in result["warnings"])


def test_full_contexts_cached_prefix_survives_a_change_of_ratio():
    """Variants that read text with one decoder LoRA base (the embedded ratios and poolings) key
    full context's and the presses' prefix by that base, the LCLM's own prefix by its checkpoint."""
    from pathlib import Path
    from types import SimpleNamespace

    from app.engine.methods import prefix_key
    from app.engine.models import LoadedVariant

    def variant(checkpoint, base):
        model = SimpleNamespace(checkpoint_id=checkpoint, dtype=torch.float32, device="cpu")
        return LoadedVariant(model, SimpleNamespace(name="studio"), None, (lambda: None) if base else None,
                             Path(base) if base else None)

    document = DocumentIds.from_ids([1, 2, 3])
    cs4, cs16, other = variant("cs4", "/base"), variant("cs16", "/base"), variant("own", None)

    def key(v, method, reader=True):
        return prefix_key(Request(document, QUESTION, v, 4), method, None, None,
                          v.text_reader_id if reader else None)
    assert key(cs4, "full") == key(cs16, "full") != key(other, "full")
    assert key(cs4, "lclm", reader=False) != key(cs16, "lclm", reader=False)
    assert other.text_reader_id == "own"
