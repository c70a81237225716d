"""Attention Matching and the quantized KV caches through the studio's services (one request
each, as the Ask tab's baseline selector sends it) and through the CLI's `ask --mode press`."""

import json

import pytest

from app.cli import main
from app.engine.service import Studio
from app.engine.settings import Settings
from app.studio.catalog import build_catalog
from app.studio.workspace import Workspace
from tests.studio.conftest import DOCUMENT
from views.ask import kvpress_choices

NEW = ("attention_matching", "quantized_4bit", "quantized_2bit")
ASK_FIELDS = ("answer", "mode", "ttft_ms", "compress_ms", "prefill_ms", "positions", "kv_cache_bytes",
              "peak_mem_bytes", "latents", "tokens", "trained", "prompt_profile", "checkpoint")


@pytest.fixture(scope="module")
def workspace(tiny_checkpoint_factory, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("home"), device="cpu", chunk_tokens=32)
    return Workspace(Studio(settings), build_catalog([str(tiny_checkpoint_factory(ratio=4))]))


def test_the_ask_tab_offers_the_new_baselines():
    offered = [value for _, value in kvpress_choices()]
    assert all(name in offered for name in NEW)


@pytest.mark.slow
def test_each_new_baseline_answers_one_request(workspace):
    document, _ = workspace.load_document(DOCUMENT, None, workspace.catalog.default)
    results = {}
    for name in NEW:
        final = list(workspace.ask("s", document.sha256, "What is the code?", workspace.catalog.default,
                                   baselines=[name], max_new_tokens=3))[-1]
        run = {m.method: m for m in final.methods}[name]
        assert run.answer is not None, run.status
        results[name] = run.answer.to_json()
    compacted, four, two = (results[n] for n in NEW)
    question = four["prefilled_positions"] - four["positions"]  # quantization keeps every position: 0
    assert question == 0 and two["positions"] == four["positions"] == four["prefilled_positions"]
    # Attention Matching keeps ceil(C / 4) of the C context positions, plus the question
    assert compacted["press_ratio"] == 0.75 and compacted["positions"] < compacted["prefilled_positions"] / 2
    # quantized bytes as stored: 2 bits store less than 4, both less than the float cache of the same positions
    float_bytes = compacted["kv_cache_bytes"] * four["positions"] / compacted["positions"]
    assert two["kv_cache_bytes"] < four["kv_cache_bytes"] < float_bytes
    assert all(r["ttft_ms"] > 0 and r["answer"] is not None for r in results.values())


@pytest.mark.slow
@pytest.mark.parametrize("press", ["attention_matching", "quantized_4bit", "quantized_2bit", "knorm"])
def test_cli_ask_mode_press_json_fields(capsys, tmp_path, tiny_checkpoint, press):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT)
    code = main(["ask", str(doc), "-q", "What is the code?", "--mode", "press", "--press", press,
                 "--checkpoint", str(tiny_checkpoint), "--max-new-tokens", "3", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert all(key in result for key in ASK_FIELDS)
    quantized = press.startswith("quantized")  # every position kept, at any ratio
    assert result["mode"] == press and result["ratio"] == (None if quantized else 4) and result["positions"] > 0
    if quantized:
        assert result["positions"] == result["prefilled_positions"]
    else:
        assert result["positions"] < result["prefilled_positions"]


@pytest.mark.parametrize("args, message", [
    (["--mode", "press"], "--mode press needs --press, one of snapkv"),
    (["--mode", "press", "--press", "nope"], "got 'nope'"),
    (["--press", "snapkv"], "--press is for --mode press"),
    (["--mode", "press", "--press", "quantized_2bit", "--kv-residual", "0"], "--kv-residual must be at least 1"),
])
def test_cli_press_flags_say_what_is_wrong(capsys, tmp_path, args, message):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT)
    code = main(["ask", str(doc), "-q", "What?", *args])
    _, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err
