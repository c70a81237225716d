"""The command line: JSON fields, and one clear stderr line (exit 2) for every user error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOC = ("Alpha beta gamma delta. The vault code is 5521. " * 12).strip()


@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(DOC)
    return path


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, pattern):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("...")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in err


def test_compress_json_fields(capsys, doc, tiny_checkpoint):
    code, out, _ = run_cli(capsys, "compress", doc, "--ratio", 4, "--checkpoint", tiny_checkpoint, "--json")
    assert code == 0
    result = json.loads(out)
    for key in ("tokens", "latents", "window", "ratio", "pooling", "compress_ms", "checkpoint", "cached", "trained"):
        assert key in result
    assert result["ratio"] == 4 and result["cached"] is False and result["compress_ms"] > 0
    # the second run is served from the cache
    code, out, _ = run_cli(capsys, "compress", doc, "--ratio", 4, "--checkpoint", tiny_checkpoint, "--json")
    again = json.loads(out)
    assert again["cached"] is True and again["compress_ms"] == 0 and again["latents"] == result["latents"]
    # --no-cache computes afresh
    code, out, _ = run_cli(capsys, "compress", doc, "--checkpoint", tiny_checkpoint, "--no-cache", "--json")
    assert json.loads(out)["cached"] is False


@pytest.mark.parametrize("mode", ["full", "lclm", pytest.param("expand", marks=pytest.mark.slow)])
def test_ask_json_fields(capsys, doc, tiny_checkpoint, mode):
    code, out, err = run_cli(capsys, "ask", doc, "-q", "What is the vault code?", "--mode", mode,
                             "--checkpoint", tiny_checkpoint, "--max-new-tokens", 6, "--json")
    assert code == 0, err
    result = json.loads(out)
    for key in ("answer", "mode", "ttft_ms", "compress_ms", "prefill_ms", "positions", "kv_cache_bytes",
                "peak_mem_bytes", "latents", "tokens", "trained"):
        assert key in result, key
    assert result["mode"] == mode and result["ttft_ms"] > 0 and result["positions"] > 0
    if mode == "full":
        assert result["latents"] == 0 and result["cached"] is False
    else:
        assert 0 < result["latents"] < result["tokens"]
    assert result["prompt_profile"] == "paper"  # the default for a checkpoint directory
    if mode == "expand":
        assert result["rounds"] and result["rounds"][0]["action"] in ("expand", "demoted")
        for key in ("number", "prompt_tokens", "expanded", "ignored", "raw_output", "action", "forced"):
            assert all(key in r for r in result["rounds"]), key
        assert [c["index"] for c in result["chunks"]] == list(range(1, len(result["chunks"]) + 1))
        assert all({"start_char", "end_char", "tokens"} <= set(c) for c in result["chunks"])


@pytest.mark.slow
def test_ask_expand_chunk_tokens_and_prompt_profile_flags(capsys, doc, tiny_checkpoint):
    code, out, err = run_cli(capsys, "ask", doc, "-q", "What is the vault code?", "--mode", "expand",
                             "--checkpoint", tiny_checkpoint, "--max-new-tokens", 3, "--chunk-tokens", 12,
                             "--prompt-profile", "studio", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["prompt_profile"] == "studio" and result["chunk_tokens"] == 12
    assert result["rounds"][0]["forced"] == "EXPAND:" and all(c["tokens"] <= 12 for c in result["chunks"])
    code, _, err = run_cli(capsys, "ask", doc, "-q", "Q?", "--mode", "expand", "--checkpoint", tiny_checkpoint,
                           "--chunk-tokens", 0)
    assert_one_line_error(code, err, "--chunk-tokens must be at least 1")


@pytest.mark.slow
def test_reconstruct_reports_per_chunk_accuracy(capsys, doc, tiny_checkpoint):
    code, out, _ = run_cli(capsys, "reconstruct", doc, "--checkpoint", tiny_checkpoint, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["chunks"] and all(0.0 <= c["token_accuracy"] <= 1.0 for c in result["chunks"])
    assert "".join(c["original"] for c in result["chunks"]).replace(" ", "") == DOC.replace(" ", "")
    assert [c["index"] for c in result["chunks"]] == list(range(1, len(result["chunks"]) + 1))


def test_missing_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "compress", tmp_path / "missing.txt")
    assert_one_line_error(code, err, "no such file")


def test_blank_document(capsys, tmp_path):
    (tmp_path / "blank.txt").write_text("  \n\n\t ")
    code, _, err = run_cli(capsys, "compress", tmp_path / "blank.txt")
    assert_one_line_error(code, err, "blank.txt is empty or only whitespace")


def test_binary_document(capsys, tmp_path):
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)))
    code, _, err = run_cli(capsys, "compress", tmp_path / "blob.txt")
    assert_one_line_error(code, err, "blob.txt is a binary file, not text")


def test_undecodable_document(capsys, tmp_path):
    (tmp_path / "latin.txt").write_bytes("café crème".encode("latin-1"))
    code, _, err = run_cli(capsys, "compress", tmp_path / "latin.txt")
    assert_one_line_error(code, err, "latin.txt is not valid UTF-8 text")


def test_document_over_token_limit(capsys, doc, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("LCLM_STUDIO_MAX_TOKENS", "10")
    code, _, err = run_cli(capsys, "compress", doc, "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, "tokens; the limit is 10")


def test_unknown_checkpoint(capsys, doc, tmp_path):
    code, _, err = run_cli(capsys, "compress", doc, "--checkpoint", tmp_path / "no-such-model")
    assert_one_line_error(code, err, "not found")


def test_hub_id_while_offline(capsys, doc):
    code, _, err = run_cli(capsys, "compress", doc, "--checkpoint", "latent-context/0.6b-4b-LCLM-16x")
    assert_one_line_error(code, err, "hub")


def test_ratio_that_the_checkpoint_was_not_trained_for(capsys, doc, tiny_checkpoint):
    code, _, err = run_cli(capsys, "compress", doc, "--checkpoint", tiny_checkpoint, "--ratio", 16)
    assert_one_line_error(code, err, "compresses at 1:4, not 1:16")


def test_empty_question(capsys, doc, tiny_checkpoint):
    code, _, err = run_cli(capsys, "ask", doc, "-q", "  ", "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, "the question is empty")


@pytest.mark.slow
def test_entry_point_prints_no_traceback(tmp_path):
    """The real `python -m app.cli` process: exit status 2 and a single stderr line."""
    proc = subprocess.run([sys.executable, "-m", "app.cli", "ask", str(tmp_path / "x.txt"), "-q", "hi"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'x.txt'}: no such file"]


@pytest.mark.slow
def test_reconstruct_uses_the_span_length_the_card_says_it_was_trained_on(capsys, doc, tiny_checkpoint, tmp_path):
    """By default reconstruction cuts chunks of the span length in the model card's recipe (what
    the variant was trained to reconstruct); --chunk-tokens overrides it; without a card, EXPAND's."""
    import shutil

    carded = tmp_path / "carded"
    shutil.copytree(tiny_checkpoint, carded)
    (carded / "model_card.json").write_text(json.dumps({"recipe": {"phases": [{"span_tokens": 12}]}}))
    runs = {}
    for name, path, extra in (("card", carded, []), ("flag", carded, ["--chunk-tokens", "20"]),
                              ("none", tiny_checkpoint, [])):
        code, out, _ = run_cli(capsys, "reconstruct", doc, "--checkpoint", path, "--max-chunks", "2", "--json", *extra)
        assert code == 0
        runs[name] = json.loads(out)
    assert (runs["card"]["chunk_tokens"], runs["card"]["trained_span"]) == (12, 12)
    assert all(c["reference_tokens"] <= 12 for c in runs["card"]["chunks"])
    assert (runs["flag"]["chunk_tokens"], runs["flag"]["trained_span"]) == (20, 12)
    assert (runs["none"]["chunk_tokens"], runs["none"]["trained_span"]) == (256, None)
    code, out, _ = run_cli(capsys, "reconstruct", doc, "--checkpoint", carded, "--max-chunks", "1")
    assert code == 0 and "chunks of 12 tokens (the span length it was trained on)" in out


@pytest.mark.slow
def test_full_context_past_the_window_is_one_line_naming_the_ratio_that_fits(tmp_path, tiny_checkpoint):
    """The real process with a document longer than the decoder's positions: exit status 2, one
    stderr line (no progress, no traceback) that names the limit and the LCLM ratio that reads it."""
    path = tmp_path / "long.txt"
    path.write_text(" ".join(f"Entry {i} reads {i * 37 % 1000} units." for i in range(1500)))
    proc = subprocess.run([sys.executable, "-m", "app.cli", "ask", str(path), "-q", "Which entry reads 37 units?",
                           "--mode", "full", "--checkpoint", str(tiny_checkpoint)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LCLM_STUDIO_HOME": str(tmp_path / "home")})
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: the prompt needs ") and "this decoder reads at most 4,096" in line
    assert "an LCLM reads it: at 1:" in line


def test_progress_is_drawn_only_on_a_terminal(capsys):
    from app.cli import Progress

    for shown in (True, False):
        progress = Progress(shown=shown)
        progress("loading", 0, 0)
        progress("encoding windows", 3, 3)
        progress.close()
        err = capsys.readouterr().err
        assert ("... loading" in err and "encoding windows" in err) if shown else err == ""
