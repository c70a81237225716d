"""The GPU runbook (docs/gpu.md) rehearsed on a CPU with tiny budgets: its commands, read from the
runbook, run here on the smoke pair and the tiny random rig; the throughput probe; the variant
loop, its packs within the return limits and a second call continuing from them; the budgeted
speed sweep resuming; and the bundle's parts each fitting one call beside the working tree."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_bundle
from model.training.campaign import (
    RECIPES,
    CampaignData,
    Phase,
    Recipe,
    pack,
    probe,
    return_problems,
    trainable_groups,
    unpack,
)
from model.training.examples import ExampleBuilder
from model.training.modeling import build_trainable
from model.training.smoke import smoke_run
from tests.test_training import builder, lclm, pair, tiny_corpus  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent
RUNBOOK = ROOT / "docs" / "gpu.md"
MiB = 2**20


def runbook_command(program: str) -> list[str]:
    """The arguments of the runbook's `python -m PROGRAM ...` in its call commands."""
    blocks = RUNBOOK.read_text().split("```")[1::2]  # the fenced code blocks
    for line in (line for block in blocks for line in block.splitlines()):
        for piece in line.replace("&&", ";").replace("|", ";").split(";"):
            words = [w for w in shlex.split(piece.strip()) if not w.startswith(("2>", ">"))]  # redirections
            if words[:3] == ["python", "-m", program] and ("--pack" in words or "--time-budget-s" in words):
                return words[3:]
    raise AssertionError(f"no python -m {program} call command in {RUNBOOK}")


def replace_option(args: list[str], option: str, value: str) -> list[str]:
    at = args.index(option)
    return args[:at + 1] + [value] + args[at + 2:]


# ---- the probe -----------------------------------------------------------------------------------
def probe_setup(pair):
    recipe = Recipe("p", "", phases=(Phase(16),), objectives={"reconstruction": 1.0}, batch_tokens=32,
                    train_decoder=True)
    lclm = build_trainable(pair)
    groups = trainable_groups(lclm, recipe)
    from model.training.data.shards import load_corpus

    data = CampaignData(ExampleBuilder(lclm), load_corpus(pair.corpus), recipe, seed=0)
    return lclm, groups, data, lclm.decoder_tokenizer.pad_token_id or 0


@pytest.mark.slow
def test_the_probe_measures_growing_batches_and_leaves_the_weights_alone(pair):
    lclm, groups, data, pad = probe_setup(pair)
    before = {n: p.detach().clone() for ps in groups.values() for n, p in ps}
    rng = torch.get_rng_state()
    found = probe(lclm, data, groups, pad, autocast=False, seconds=0.3, scales=(1, 2, 4))
    measured = [int(t) for t in found["tokens_per_s"]]
    assert measured == [32, 64, 128][:len(measured)] and found["batch_tokens"] in measured
    assert all(rate > 0 for rate in found["tokens_per_s"].values())
    best = max(found["tokens_per_s"].values())
    assert found["tokens_per_s"][found["batch_tokens"]] * 1.05 >= best
    assert data.recipe.batch_tokens == 32 and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p, before[n]) and p.grad is None for ps in groups.values() for n, p in ps)


def test_the_probe_stops_at_out_of_memory_and_keeps_what_it_measured(pair, out_of_memory, monkeypatch):
    from model.training.campaign import loop  # where probe looks up step_loss

    lclm, groups, data, pad = probe_setup(pair)
    calls = out_of_memory(loop, "step_loss", call=3)  # the second candidate's first step
    found = probe(lclm, data, groups, pad, autocast=False, seconds=0.0, scales=(1, 2, 4))
    assert len(calls) >= 3 and found["stopped"] == "out of memory at 64"
    assert found["batch_tokens"] == 32 and list(found["tokens_per_s"]) == [32]


# ---- the training call and the next one ----------------------------------------------------------
@pytest.mark.slow
def test_the_runbook_training_call_packs_within_the_return_limits_and_a_fresh_machine_continues(tmp_path):
    """The runbook's train command with the smoke pair (two variants), a one-second probe and a
    box of seconds; then the same command on a "fresh machine" (new folders) that has only what
    came back, then --publish-only's unpacking here."""
    smoke_run(tmp_path)
    args = runbook_command("model.training.campaign")
    args = replace_option(args, "--variants", "first,second")
    args = replace_option(args, "--minutes", "1.2")
    args = replace_option(args, "--eval-minutes", "5")  # validation at the start and end of each box only

    def call(machine: Path, returned: Path) -> subprocess.CompletedProcess:
        where = replace_option(replace_option(args, "--state", str(machine / "state")), "--out", str(machine / "out"))
        where = replace_option(replace_option(where, "--pack", str(machine / "OUT")), "--returned", str(returned))
        command = [sys.executable, "-m", "model.training.campaign", *where, "--smoke", "--recipe", "curriculum",
                   "--threads", "1", "--quiet", "--probe-s", "1"]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)

    first = call(tmp_path / "one", tmp_path / "nothing-yet")
    assert first.returncode == 0, first.stderr[-2000:]
    back = tmp_path / "one" / "OUT"
    assert sorted(p.name for p in back.iterdir()) == ["first.tar.0", "second.tar.0"] and not return_problems(back)
    states = {v: json.loads((tmp_path / "one" / "state" / v / "state.json").read_text()) for v in ("first", "second")}
    for state in states.values():
        assert state["step"] > 0 and state["probe"]["batch_tokens"] in {int(t) for t in state["probe"]["tokens_per_s"]}
    assert states["first"]["wall_s"] < 1.2 * 60  # each variant its share of the one box

    second = call(tmp_path / "two", back)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "first: continuing from" in second.stdout and "second: continuing from" in second.stdout
    for variant, before in states.items():
        after = json.loads((tmp_path / "two" / "state" / variant / "state.json").read_text())
        assert after["step"] >= before["step"] and after["calls"] == 2 and after["optimizer_restarts"] == 1
        assert after["evals"][:len(before["evals"])] == before["evals"]
        metrics = json.loads((tmp_path / "two" / "out" / variant / "metrics.json").read_text())
        assert metrics["step"] == after["step"] and (tmp_path / "two" / "out" / variant / "final").is_dir()

    here = tmp_path / "here"
    assert unpack("first", tmp_path / "two" / "OUT", here / "state", here / "out")
    assert json.loads((here / "state" / "state.json").read_text())["calls"] == 2
    assert not unpack("first", back, here / "state", here / "out")  # older than what is here: left alone


def test_packs_are_cut_under_the_file_limit_and_join_again(tmp_path):
    state, out = tmp_path / "state", tmp_path / "out"
    state.mkdir()
    (state / "state.json").write_text(json.dumps({"step": 3}))
    (out / "final").mkdir(parents=True)
    (out / "final" / "big.safetensors").write_bytes(bytes(range(256)) * (17 * MiB // 256))  # over one part
    parts = pack("v", state, out, tmp_path / "OUT")
    assert [p.name for p in parts] == ["v.tar.0", "v.tar.1"] and all(p.stat().st_size <= 15 * MiB for p in parts)
    assert not return_problems(tmp_path / "OUT")
    assert unpack("v", tmp_path / "OUT", tmp_path / "s2", tmp_path / "o2")
    assert ((tmp_path / "o2" / "final" / "big.safetensors").read_bytes()
            == (out / "final" / "big.safetensors").read_bytes())
    for index in range(8):
        (tmp_path / "OUT" / f"w.tar.{index}").write_bytes(b"x")
    assert return_problems(tmp_path / "OUT") == ["10 files (at most 8)"]


# ---- the measuring call ------------------------------------------------------------------------
@pytest.mark.slow
def test_the_runbook_speed_sweep_keeps_its_budget_and_resumes(tmp_path, monkeypatch):
    """The runbook's bench.speed command on the tiny random pair on the CPU: a budget too short for
    every point leaves some over budget; the same command again takes over what was measured
    (same samples) and measures the rest."""
    from bench.speed import __main__ as speed
    from bench.speed.sweep import Sweep

    torch.set_num_threads(1)
    args = runbook_command("bench.speed")
    args = replace_option(args, "--out-dir", str(tmp_path))
    tiny = ["--pair", "tiny", "--device", "cpu", "--lengths", "32", "64", "128", "--ratios", "8", "16", "--methods",
            "full", "lclm", "--runs", "2", "--new-tokens", "2", "--no-plots"]
    elapsed = iter(range(0, 10**6, 1))  # each look at the clock: one second later
    monkeypatch.setattr(Sweep, "elapsed", lambda self: float(next(elapsed)))
    first = speed.main(replace_option(args, "--time-budget-s", "12") + tiny)
    statuses = [r["status"] for r in first["records"]]
    assert "ok" in statuses and "over_budget" in statuses and set(statuses) <= {"ok", "over_budget"}
    measured = {(r["method"], r["ratio"], r["tokens"]): r["samples"] for r in first["records"] if r["status"] == "ok"}
    elapsed = iter(range(0, 10**6, 1))
    monkeypatch.setattr(Sweep, "elapsed", lambda self: float(next(elapsed) / 100))
    second = speed.main(args + tiny)
    assert speed.main(["--plots-from", str(tmp_path / "speed-gpu-h200.json")]) == second
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".md", ".png", ".png", ".png"]
    again = {(r["method"], r["ratio"], r["tokens"]): r for r in second["records"]}
    assert all(r["status"] == "ok" and r["runs"] == 2 for r in again.values())
    for key, samples in measured.items():
        assert again[key]["samples"][:len(samples)] == samples  # taken over, not measured again
    assert all(p.stat().st_size < 16 * MiB for p in tmp_path.iterdir())


# ---- the bundle ----------------------------------------------------------------------------------
def test_bundle_parts_each_fit_one_call_beside_the_tree_and_set_up_the_repository(tmp_path):
    corpus = tmp_path / "corpus.safetensors.xz"
    corpus.write_bytes(b"c" * (3 * MiB))
    packed = tmp_path / "v.tar.0"
    packed.write_bytes(b"p" * MiB)
    tree = 60 * MiB  # leaves 2 MiB a part
    parts = gpu_bundle.build([(corpus, gpu_bundle.CORPUS), (packed, f"{gpu_bundle.RETURNED}/v.tar.0")],
                             tmp_path / "bundle", tree)
    assert len(parts) == 3 and [p.name for p in parts][-1] == "part-3-of-3"
    assert gpu_bundle.check(tmp_path / "bundle", tree) == []
    assert gpu_bundle.check(tmp_path / "bundle", 63 * MiB)  # a larger tree: a part no longer fits
    repo = tmp_path / "repo"
    (repo / "data").parent.mkdir(parents=True)
    (repo / "data").symlink_to(tmp_path / "elsewhere")  # the data link travels dangling
    gpu_bundle.setup(tmp_path / "bundle", repo, install=False)
    assert (repo / gpu_bundle.CORPUS).read_bytes() == corpus.read_bytes()
    assert (repo / gpu_bundle.RETURNED / "v.tar.0").read_bytes() == packed.read_bytes()
    parts[1].unlink()
    with pytest.raises(SystemExit, match=r"parts \[2\] of 3 are missing"):
        gpu_bundle.join(tmp_path / "bundle")


def test_the_working_tree_leaves_room_for_the_bundle():
    tree = gpu_bundle.tree_bytes()
    assert 0 < tree < 16 * MiB and gpu_bundle.part_bytes(tree) > 40 * MiB
    if list(gpu_bundle.BUNDLE.glob("part-*-of-*")):  # made by make gpu-bundle
        assert gpu_bundle.check(gpu_bundle.BUNDLE, tree) == []
