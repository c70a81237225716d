"""End to end on the embedded SmolLM2 default (converted from its GGUF once per test session).
Select with `pytest -m embedded`; `make test` runs them too."""

import json
import os

import pytest
import torch

from app.engine.service import AskRequest, Studio
from app.engine.settings import Settings

pytestmark = pytest.mark.embedded

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 12
NEEDLE_DOC = FILLER + "The special magic number is 7294. " + FILLER
QUESTION = "What is the special magic number?"
# Python source of the kind the shipped variants were trained to reconstruct (written for this test).
RECONSTRUCTION_TEXT = '''def moving_average(values, window):
    """Return the averages of every run of `window` consecutive values.

    A window larger than the list gives an empty result.
    """
    if window <= 0:
        raise ValueError("window must be positive")
    total = sum(values[:window])
    averages = [total / window] if len(values) >= window else []
    for index in range(window, len(values)):
        total += values[index] - values[index - window]
        averages.append(total / window)
    return averages
'''


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("lclm-home"), device="cpu", dtype="float32")
    return Studio(settings)


@pytest.fixture(scope="module")
def bf16_studio(studio):
    """The same data directory (the converted model), in bfloat16."""
    return Studio(Settings(data_dir=studio.settings.data_dir, device="cpu", dtype="bfloat16"))


@pytest.fixture(scope="module")
def plain_studio(studio):
    """The same, without prefix reuse."""
    return Studio(Settings(data_dir=studio.settings.data_dir, device="cpu", dtype="float32", kv_cache_mb=0))


def final(events):
    events = list(events)
    assert events[-1].kind == "done"
    return events, events[-1].result


def test_full_context_answers_the_needle(studio):
    events, result = final(studio.ask(AskRequest(NEEDLE_DOC, QUESTION, method="full", max_new_tokens=24)))
    assert "7294" in result["answer"]
    assert result["trained"] is True and result["latents"] == 0
    streamed = "".join(e.text for e in events if e.kind == "token")
    assert streamed.strip() == result["answer"]


def test_full_context_answers_the_needle_in_bfloat16(bf16_studio):
    _, result = final(bf16_studio.ask(AskRequest(NEEDLE_DOC, QUESTION, method="full", max_new_tokens=24)))
    assert "7294" in result["answer"] and result["dtype"] == "bfloat16"
    model = bf16_studio.model()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


FOLLOW_UPS = [QUESTION, "What colour is the sky?", QUESTION]


@pytest.mark.parametrize("mode", ["full", "lclm"])
def test_follow_up_questions_reuse_the_prefix_and_answer_as_without_reuse(studio, plain_studio, mode):
    asked = [AskRequest(NEEDLE_DOC, q, method=mode, ratio=16, max_new_tokens=16) for q in FOLLOW_UPS]
    reused = [final(studio.ask(a))[1] for a in asked]
    plain = [final(plain_studio.ask(a))[1] for a in asked]
    assert [r["answer"] for r in reused] == [r["answer"] for r in plain]
    assert all(r["prefix_reused_positions"] > 0 for r in reused[1:]) and reused[0]["answer"] == reused[2]["answer"]
    assert all(r["prefix_reused_positions"] == 0 for r in plain)
    if mode == "full":
        assert "7294" in reused[2]["answer"]


def test_bfloat16_follow_up_answers_as_without_reuse(bf16_studio, studio):
    plain = Studio(Settings(data_dir=studio.settings.data_dir, device="cpu", dtype="bfloat16", kv_cache_mb=0))
    asked = [AskRequest(NEEDLE_DOC, q, method="full", max_new_tokens=16) for q in FOLLOW_UPS]
    reused = [final(bf16_studio.ask(a))[1] for a in asked]
    alone = [final(plain.ask(a))[1] for a in asked]
    # in bfloat16 a prefill in two pieces rounds differently from one in one piece (float32 answers
    # are exactly equal, above), so a near-tie late in an answer may go either way
    for with_reuse, without in zip(reused, alone):
        assert len(os.path.commonprefix([with_reuse["answer"], without["answer"]])) >= 24
    assert "7294" in reused[0]["answer"] and reused[0]["answer"] == reused[2]["answer"]
    assert reused[1]["prefix_reused_positions"] > 0


def test_lclm_runs_end_to_end_and_says_untrained(studio):
    events, result = final(studio.ask(AskRequest(NEEDLE_DOC, QUESTION, method="lclm", ratio=8, pooling="mean",
                                          max_new_tokens=8)))
    assert result["trained"] is False and "untrained" in result["note"]  # no 1:8 mean weights ship
    assert result["latents"] == -(-result["tokens"] // 8)
    full = final(studio.ask(AskRequest(NEEDLE_DOC, QUESTION, method="full", max_new_tokens=1)))[1]
    full_positions = full["positions"]
    assert result["positions"] < full_positions / 4  # the decoder reads far fewer positions


def test_expand_and_reconstruct_run(studio):
    _, result = final(studio.ask(AskRequest(NEEDLE_DOC, QUESTION, method="expand", ratio=16, max_new_tokens=8)))
    assert result["prompt_profile"] == "studio"  # the embedded model's default
    assert result["rounds"][0]["forced"] == "EXPAND:" and result["rounds"][-1]["action"] in ("answer", "forced")
    assert len(result["chunks"]) > 1 and all(c["tokens"] <= 256 for c in result["chunks"])
    _, paper = final(studio.ask(AskRequest(NEEDLE_DOC, QUESTION, method="expand", ratio=16, max_new_tokens=8,
                                prompt_profile="paper")))
    assert paper["prompt_profile"] == "paper" and paper["cached"] is True  # the chunks' latents from the first run
    assert paper["rounds"][0]["forced"] is None and paper["rounds"][-1]["action"] in ("answer", "forced")
    assert paper["expanded"] and all(1 <= n <= len(paper["chunks"]) for n in paper["expanded"])
    rec = studio.reconstruct(NEEDLE_DOC, ratio=16, max_chunks=1)
    assert rec["trained"] is True and len(rec["chunks"]) == 1  # 1:16 mean weights ship
    assert rec["chunk_tokens"] == rec["trained_span"] == 64  # the span length its card says it was trained on
    assert 0.0 <= rec["chunks"][0]["token_accuracy"] <= 1.0


def test_save_and_load_in_published_layout(studio, tmp_path):
    from model.loading import load_lclm, save_lclm

    model = studio.model(ratio=8, pooling="mean")  # no 1:8 mean weights ship
    save_lclm(model, tmp_path / "ckpt")
    again = load_lclm(str(tmp_path / "ckpt"), device="cpu")
    ids = model.tokenize_document(NEEDLE_DOC[:400]).ids
    assert again.config.trained is False and again.config.pooling == "mean"
    assert (again.compress(ids) - model.compress(ids)).abs().max() == 0


# Halfway between the untrained and the shipped variant on RECONSTRUCTION_TEXT (float32), measured
# when the weights were shipped. 1:4 concat (warm-lora-recon): teacher-forced 0.429 untrained, 0.777
# trained; free-running 0.025 and 0.314.
# 1:16 mean (warm-lora-recon): teacher-forced 0.438 and 0.688, free-running 0.017 and 0.051. 1:8 concat: teacher-forced
# 0.446 and 0.554; free-running 0.0085 and 0.0254 (one token and three), too small a rise for a floor.
# 1:4 mean: teacher-forced 0.429 and 0.563, free-running 0.025 and 0.102.
RECONSTRUCTION_FLOORS = {(4, "concat"): {"free_running": 0.17, "teacher_forced": 0.60},
                         (4, "mean"): {"free_running": 0.06, "teacher_forced": 0.50},
                         (8, "concat"): {"free_running": None, "teacher_forced": 0.50},
                         (16, "mean"): {"free_running": 0.034, "teacher_forced": 0.56}}


def shipped_variants() -> list[tuple[int, str]]:
    from model.embedded import TRAINED_WEIGHTS

    found = []
    for card in sorted(TRAINED_WEIGHTS.glob("*/model_card.json")):
        config = json.loads((card.parent / "model_config.json").read_text())
        found.append((config["compression_ratio"], config["pooling"]))
    return found


def test_trained_variants_ship_and_say_so(studio):
    assert {(4, "concat"), (4, "mean"), (8, "concat"), (16, "mean")} <= set(shipped_variants())
    for ratio, pooling in shipped_variants():
        model = studio.model(ratio=ratio, pooling=pooling)
        assert model.config.trained is True and "untrained" not in model.checkpoint_id


@pytest.mark.parametrize("ratio, pooling", shipped_variants())
def test_shipped_weights_reconstruct_better_than_untrained(studio, ratio, pooling):
    """Free-running (the studio's Reconstruction) and teacher-forced token accuracy of a shipped
    variant on a text none was trained on, against thresholds between the untrained and the
    trained values measured when the weights were shipped (docs/training.md, "Training the embedded
    default on a CPU: campaigns"), on chunks of 256 tokens."""
    from model.training.campaign import validate
    from model.training.examples import ExampleBuilder

    floors = RECONSTRUCTION_FLOORS[(ratio, pooling)]
    rec = studio.reconstruct(RECONSTRUCTION_TEXT, ratio=ratio, pooling=pooling, use_cache=False,
                             chunk_tokens=256)  # the floors' chunk length
    assert rec["trained"] is True and "note" not in rec
    if floors["free_running"] is not None:
        assert rec["token_accuracy"] >= floors["free_running"], rec["token_accuracy"]
    model = studio.model(ratio=ratio, pooling=pooling)
    ids = model.decoder_tokenizer(RECONSTRUCTION_TEXT, add_special_tokens=False)["input_ids"]
    spans = [ids[:56], ids[56:112]]
    result = validate(model, ExampleBuilder(model), spans, model.decoder_tokenizer.pad_token_id or 0, 0,
                      autocast=False)
    assert result["teacher_forced"] >= floors["teacher_forced"], result
