"""Every CLI command x mode x output form (text and --json) end to end on tiny checkpoints of
both families: exit status 0, nothing but progress on stderr, and the text form printing the
same result as the JSON form, so that no printer can drift from its result."""

import json
from pathlib import Path

import pytest

from app.cli import main
from app.engine.methods import PRESS_METHODS

DOC = ("Alpha beta gamma delta. The vault code is 5521. " * 12).strip()
CASES = [("compress", None), ("ask", "full"), ("ask", "lclm"), ("ask", "expand"), ("reconstruct", None)]


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def checkpoint(request, tiny_checkpoint_factory):
    return tiny_checkpoint_factory(family=request.param, ratio=4, pooling="mean", window=16)


@pytest.fixture
def doc(tmp_path, monkeypatch):
    monkeypatch.setenv("LCLM_STUDIO_CHUNK_TOKENS", "32")  # several chunks to expand and reconstruct
    path = tmp_path / "doc.txt"
    path.write_text(DOC)
    return path


def run(capsys, command, mode, doc, checkpoint, *extra):
    args = [command, str(doc), "--checkpoint", str(checkpoint), "--no-cache", *extra]
    if command == "ask":
        args += ["-q", "What is the vault code?", "--mode", mode, "--max-new-tokens", "6"]
    if command == "reconstruct":
        args += ["--max-chunks", "2"]
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in err and "warning" not in err.lower()
    # stderr holds progress only: "..." messages and tqdm bars named after a stage
    stages = ("encoding windows", "encoding chunks", "reconstructing chunks")
    for line in err.replace("\r", "\n").splitlines():
        assert not line.strip() or line.startswith("... ") or line.strip().startswith(stages), line
    return out


@pytest.mark.slow
@pytest.mark.parametrize("command, mode", CASES, ids=[f"{c}-{m}" if m else c for c, m in CASES])
def test_text_and_json_agree(capsys, doc, checkpoint, command, mode):
    result = json.loads(run(capsys, command, mode, doc, checkpoint, "--json"))
    text = run(capsys, command, mode, doc, checkpoint)
    lines = text.rstrip("\n").split("\n")
    if command == "compress":
        assert lines[0] == (f"{result['tokens']:,} tokens -> {result['latents']:,} latents (1:{result['ratio']}, "
                            f"{result['pooling']} pooling, window {result['window']})")
        assert lines[2] == f"checkpoint: {result['checkpoint']}"
    elif command == "ask":
        assert result["mode"] == mode
        assert text.startswith(result["answer"] + "\n")  # greedy decoding: the same answer both times
        rounds = result.get("rounds", [])
        assert (mode == "expand") == bool(rounds)
        round_lines = [line for line in lines if line.startswith("round ")]
        assert len(round_lines) == len(rounds)
        for line, rnd in zip(round_lines, rounds):
            assert line.startswith(f"round {rnd['number']}: {rnd['action']}")
            for index in rnd["expanded"]:
                assert str(index) in line
        assert lines[-1].startswith(f"[{mode}] TTFT ") and f"{result['positions']:,} positions" in lines[-1]
        assert [line for line in lines if line.startswith("WARNING: ")] == [f"WARNING: {w}" for w in result["warnings"]]
        assert any(line.startswith("answer's first token after") for line in lines) == (mode == "expand")
    else:
        headers = [line for line in lines if line.startswith("--- chunk ")]
        assert len(headers) == len(result["chunks"]) == 2
        for header, chunk in zip(headers, result["chunks"]):
            assert header.startswith(f"--- chunk {chunk['index']}: token accuracy {chunk['token_accuracy']:.3f}")
        assert lines[-1] == (f"overall token accuracy {result['token_accuracy']:.3f} at 1:{result['ratio']} "
                             f"({result['pooling']}), chunks of {result['chunk_tokens']} tokens; chunks 1-2 of "
                             f"{result['total_chunks']}")


def test_expand_rounds_print_only_the_fields_they_have():
    from app.cli import round_text

    assert round_text({"number": 1, "action": "expand", "expanded": [2, 5], "ignored": ["9: no such chunk (1-6)"],
                       "raw_output": "EXPAND: 2, 5, 9"}) == ("round 1: expand chunks 2, 5 "
                                                             "(ignored 9: no such chunk (1-6))")
    assert round_text({"number": 2, "action": "answer", "expanded": [], "ignored": []}) == "round 2: answer"
    assert round_text({"action": "answer", "chunk_titles": ["x"]}) == "round: answer"  # unknown keys are left out


# The JSON keys of every command and mode, as the studio's API and scripts read them: a new key
# is added here on purpose, a lost or renamed one fails.
GOLDEN_KEYS = Path(__file__).parent / "golden" / "cli_json_keys.json"
KEY_CASES = [*CASES, ("ask", "snapkv"), ("ask", "quantized_4bit")]  # a press and a quantized press


def press_run(capsys, command, mode, doc, checkpoint) -> str:
    """`run` with --json, a press's name standing for `--mode press --press NAME`."""
    if mode in PRESS_METHODS:
        return run(capsys, command, "press", doc, checkpoint, "--json", "--press", mode)
    return run(capsys, command, mode, doc, checkpoint, "--json")


@pytest.mark.slow
@pytest.mark.parametrize("command, mode", KEY_CASES, ids=[f"{c}-{m}" if m else c for c, m in KEY_CASES])
def test_the_json_keys_are_those_scripts_read(capsys, doc, checkpoint, command, mode):
    result = json.loads(press_run(capsys, command, mode, doc, checkpoint))
    golden = json.loads(GOLDEN_KEYS.read_text())[f"{command}-{mode}" if mode else command]
    assert sorted(result) == golden["keys"]
    nested = {"rounds": "round_keys", "chunks": "chunk_keys"}
    for field, name in nested.items():
        if name in golden:
            assert all(sorted(item) == golden[name] for item in result[field]), field
