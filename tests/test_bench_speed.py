"""The speed benchmark (`python -m bench.speed`) on tiny models: it runs end to end through both
rigs, writes JSON, a Markdown table and plots with the expected fields, and its analytic limit
gives the issue's reference numbers. Nothing here asserts anything about time."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen3Config

from bench.speed.__main__ import main
from bench.speed.analytic import Shape, cached_ttft_gain_limit, ttft_gain_limit
from bench.speed.methods import TIMED_METHODS
from bench.speed.rigs import QWEN3_4B_INSTRUCT_2507, QWEN3_EMBEDDING_0_6B
from bench.speed.sweep import MEASURED_FIELDS, Plan
from model.presses import PRESSES

PAPER_ENCODER = Shape.from_config(Qwen3Config(**QWEN3_EMBEDDING_0_6B))
PAPER_DECODER = Shape.from_config(Qwen3Config(**QWEN3_4B_INSTRUCT_2507))


# ---- the analytic limit ------------------------------------------------------------------------
@pytest.mark.parametrize("tokens, expected", [(4096, 5.8), (32768, 11), (131072, 29), (1 << 20, 119)])
def test_analytic_limit_gives_the_issue_numbers_for_the_paper_pair(tokens, expected):
    assert ttft_gain_limit(PAPER_ENCODER, PAPER_DECODER, tokens, ratio=16, window=1024) == pytest.approx(
        expected, rel=0.04)


def test_analytic_limit_grows_with_length_and_ratio_and_cached_beats_cold():
    gains = [ttft_gain_limit(PAPER_ENCODER, PAPER_DECODER, t, 16, 1024) for t in (4096, 65536, 1 << 20)]
    assert gains == sorted(gains)
    by_ratio = [ttft_gain_limit(PAPER_ENCODER, PAPER_DECODER, 32768, n, 1024) for n in (4, 8, 16)]
    assert by_ratio == sorted(by_ratio)
    assert cached_ttft_gain_limit(PAPER_DECODER, 32768, 16) > by_ratio[-1]


def test_paper_decoder_full_context_kv_cache_at_1m_tokens_is_144_gib():
    assert PAPER_DECODER.kv_bytes_per_token(element_bytes=2) * 2**20 / 2**30 == pytest.approx(144)


def test_plan_caps_and_registry():
    scenarios = {"full", "lclm", "lclm_cached", "full_followup", "lclm_followup", "question_only"}
    assert set(TIMED_METHODS) == scenarios | set(PRESSES)  # every press of the registry is measured
    plan = Plan(lengths=[1024, 4096], ratios=[16, 4], methods=["kvzip"], max_length={"kvzip": 4096},
                sweep_max_length={"kvzip": 1024})
    assert plan.main_ratio == 16 and plan.ratios == [4, 16]
    assert plan.planned("kvzip", 16, 4096) and plan.planned("kvzip", 4, 1024) and not plan.planned("kvzip", 4, 4096)
    with pytest.raises(ValueError):
        Plan(lengths=[1024], ratios=[16], methods=["nope"])


# ---- end to end --------------------------------------------------------------------------------
def check_record_fields(record: dict, runs: int) -> None:
    assert record["status"] == "ok", record
    assert record["runs"] == runs
    assert set(MEASURED_FIELDS) <= set(record["median"])
    assert record["median"]["ttft_ms"] > 0 and record["median"]["positions"] > 0
    assert record["median"]["ttft_ms"] >= record["median"]["prefill_ms"] + record["median"]["compress_ms"]
    assert record["median"]["kv_cache_bytes"] > 0 and record["median"]["tokens_per_s"] > 0


@pytest.mark.slow
def test_checkpoint_rig_end_to_end(tiny_checkpoint_factory, tmp_path, one_thread):
    """The CPU preset's path (the app's loader) on a tiny checkpoint: every method but KVzip, whose
    kvpress implementation cannot mask keys of tiny random models (see the random-pair test)."""
    path = tiny_checkpoint_factory(family="qwen3", ratio=4, window=16)
    data = main(["--preset", "cpu", "--checkpoint", str(path), "--lengths", "40", "64", "--ratios", "4", "8",
                 "--methods", "full", "lclm", "lclm_cached", "snapkv", "--runs", "2", "--new-tokens", "3",
                 "--out-dir", str(tmp_path), "--name", "speed-test"])

    assert json.loads((tmp_path / "speed-test.json").read_text()) == data
    for suffix in ("-ttft.png", "-memory.png", "-compress.png"):
        assert (tmp_path / f"speed-test{suffix}").stat().st_size > 10_000
    table = (tmp_path / "speed-test.md").read_text()
    assert table.startswith("| tokens | method |") and "| 64 | lclm | 1:8 |" in table
    assert data["machine"]["name"] and data["machine"]["kind"] == "cpu" and data["rig"]["window"] == 16
    assert {(a["tokens"], a["ratio"]) for a in data["analytic"]} == {(t, n) for t in (40, 64) for n in (4, 8)}

    records = {(r["method"], r["ratio"], r["tokens"]): r for r in data["records"]}
    assert len(records) == 2 * (1 + 3 * 2)  # full once per length, every other method once per ratio
    prompt = data["rig"]["prompt_tokens"]
    for tokens in (40, 64):
        full = records[("full", None, tokens)]
        check_record_fields(full, runs=2)
        assert full["median"]["positions"] == tokens + prompt
        assert all(v == 1.0 for v in full["vs_full"].values() if v is not None)
        for ratio in (4, 8):
            latents = (tokens // 16) * (16 // ratio) + -(-(tokens % 16) // ratio)  # ceil(L/N) per window of 16
            for method in ("lclm", "lclm_cached"):
                r = records[(method, ratio, tokens)]
                check_record_fields(r, runs=2)
                assert r["latents"] == latents
                assert r["median"]["positions"] == latents + 2 + prompt
                assert r["vs_full"]["ttft_ms"] == pytest.approx(r["median"]["ttft_ms"] / full["median"]["ttft_ms"],
                                                                rel=1e-2)
                assert r["ttft_gain"] > 0 and r["analytic_ttft_gain"] > 1 and "share_of_analytic" in r
            assert records[("lclm_cached", ratio, tokens)]["median"]["compress_ms"] == 0
            assert records[("lclm", ratio, tokens)]["compress_tokens_per_s"] > 0
            snap = records[("snapkv", ratio, tokens)]
            check_record_fields(snap, runs=2)
            assert snap["median"]["positions"] < full["median"]["positions"] and snap["median"]["compress_ms"] > 0
            assert snap["kv_positions_held"] < full["median"]["positions"]


@pytest.mark.slow
def test_random_pair_rig_end_to_end(tmp_path, one_thread):
    """The GPU preset's path (random Qwen3 pair, minimal tokenizer) with tiny shapes on the CPU."""
    data = main(["--preset", "gpu", "--pair", "tiny", "--device", "cpu", "--lengths", "96", "--ratios", "8", "16",
                 "--runs", "1", "--new-tokens", "2", "--out-dir", str(tmp_path), "--no-plots"])
    assert data["rig"]["dtype"] == "float32" and data["rig"]["decoder"]["layers"] == 3
    records = {(r["method"], r["ratio"]): r for r in data["records"]}
    assert set(records) == {("full", None), ("full_followup", None), ("question_only", None), ("quantized_4bit", None),
                            ("quantized_2bit", None)} | {
        (m, n) for m in ("lclm", "lclm_cached", "lclm_followup", "snapkv", "kvzip", "attention_matching")
        for n in (8, 16)}
    for r in records.values():
        check_record_fields(r, runs=1)
    full_positions = records[("full", None)]["median"]["positions"]
    for ratio in (8, 16):
        # kvpress's KVzip masks evicted keys and keeps them; SnapKV drops them
        assert records[("kvzip", ratio)]["kv_positions_held"] == full_positions
        assert records[("snapkv", ratio)]["kv_positions_held"] < full_positions
        for press in ("snapkv", "kvzip"):
            assert records[(press, ratio)]["median"]["positions"] < full_positions


@pytest.mark.slow
def test_random_pair_rig_shows_what_does_not_fit(tmp_path, one_thread):
    """A device "smaller" than the weights leaves no room for a full-context prefill (predicted,
    not attempted), while the LCLM, which is not predicted, just runs."""
    data = main(["--preset", "gpu", "--pair", "tiny", "--device", "cpu", "--lengths", "64", "128",
                 "--ratios", "16", "--methods", "full", "lclm", "lclm_cached", "snapkv", "--runs", "1",
                 "--new-tokens", "2", "--memory-limit-gib", "0.0001", "--out-dir", str(tmp_path), "--no-plots"])
    statuses = {(r["method"], r["tokens"]): r["status"] for r in data["records"]}
    assert statuses == {("full", 64): "does_not_fit", ("full", 128): "does_not_fit",
                        ("snapkv", 64): "does_not_fit", ("snapkv", 128): "does_not_fit",
                        ("lclm", 64): "ok", ("lclm", 128): "ok", ("lclm_cached", 64): "ok", ("lclm_cached", 128): "ok"}
    for r in data["records"]:
        if r["status"] == "does_not_fit":
            assert "GiB" in r["reason"] and r["predicted_peak_above_weights_bytes"] > 0
        else:
            assert "vs_full" not in r and r["analytic_ttft_gain"] > 1


def test_memory_prediction_scales_by_positions_reached_not_kept():
    """A press prefills the whole context, then keeps 1/N of it: its measured peak is divided by
    the positions it reached, so a twice-as-long document is predicted to need about twice as much."""
    from types import SimpleNamespace

    from bench.speed.sweep import Point, predicted_bytes

    rig = SimpleNamespace(dtype=torch.float32, decoder_shape=PAPER_DECODER, before=[0] * 10, after=[0] * 20)
    peak = 2 * 2**30  # well above the prior guess of the KV cache plus one layer's activations per position
    measured = Point("snapkv", 16, 1000, status="ok", samples=[{
        **{f: 1.0 for f in MEASURED_FIELDS}, "peak_mem_above_weights_bytes": peak, "positions": 90}])
    reached = TIMED_METHODS["snapkv"].positions_needed(rig, 2000, 16, 4)
    assert reached == 10 + 2000 + 20 + 4
    predicted = predicted_bytes(rig, {measured.key: measured}, "snapkv", reached, new_tokens=4)
    assert predicted == int(peak / (10 + 1000 + 20 + 4) * reached)  # about twice the measured peak
    assert predicted < 3 * peak  # not peak / 90 kept positions x 2,034 (about 22x)


@pytest.mark.slow
def test_dtypes_in_one_run_and_follow_up_questions(tiny_checkpoint_factory, tmp_path, one_thread):
    """--dtypes float32 bfloat16: one rig per dtype, their runs interleaved, one result per dtype and
    a comparison of the two; follow-ups prefill only the question after the kept prefix."""
    path = tiny_checkpoint_factory(family="qwen3", ratio=4, window=16)
    data = main(["--preset", "cpu", "--checkpoint", str(path), "--lengths", "48", "--ratios", "4", "--methods", "full",
                 "lclm", "full_followup", "lclm_followup", "question_only", "--dtypes", "float32", "bfloat16",
                 "--runs", "2", "--new-tokens", "2", "--out-dir", str(tmp_path), "--name", "speed-test", "--no-plots"])
    assert set(data) == {"float32", "bfloat16"}
    assert data["float32"]["rig"]["dtype"] == "float32" and data["bfloat16"]["rig"]["dtype"] == "bfloat16"
    assert data["bfloat16"]["machine"]["dtype_reason"] == "asked for"
    peak = data["float32"]["machine"]["matmul_peak"]
    assert peak["float32_gflops"] > 0 and peak["bfloat16_gflops"] > 0 and peak["threads"] == 1
    for name in ("float32", "bfloat16"):
        assert json.loads((tmp_path / f"speed-test-{name}.json").read_text()) == data[name]
        records = {(r["method"], r["ratio"]): r for r in data[name]["records"]}
        full, question = records[("full", None)], records[("question_only", None)]
        for method, ratio, whole in (("full_followup", None, full), ("lclm_followup", 4, records[("lclm", 4)])):
            r = records[(method, ratio)]
            check_record_fields(r, runs=2)
            assert r["median"]["positions"] == whole["median"]["positions"]  # the same prompt ...
            assert r["prefill_positions"] == question["median"]["positions"]  # ... of which only the question is new
            assert r["prefix_reused_positions"] + r["prefill_positions"] == r["median"]["positions"]
            assert r["prefill_gflops"] > 0 and r["share_of_bf16_peak"] > 0
        assert full["share_of_bf16_peak"] > 0 and records[("lclm", 4)]["prefill_gflops"] > 0
    comparison = json.loads((tmp_path / "speed-test-dtypes.json").read_text())
    assert comparison["dtypes"] == ["float32", "bfloat16"]
    rows = {(r["method"], r["ratio"]): r for r in comparison["rows"]}
    assert set(rows) == {("full", None), ("lclm", 4), ("full_followup", None), ("lclm_followup", 4),
                         ("question_only", None)}
    full = rows[("full", None)]
    assert full["ttft_float32_over_bfloat16"] == pytest.approx(full["float32_ttft_ms"] / full["bfloat16_ttft_ms"],
                                                               rel=1e-2)
    table = (tmp_path / "speed-test-dtypes.md").read_text()
    assert table.startswith("| tokens | method | 1:N | TTFT ms float32 | TTFT ms bfloat16 | float32 / bfloat16 |")


def test_prefill_profile_lists_the_operators(tiny_checkpoint_factory, one_thread, capsys):
    from bench.speed.op_profile import main as profile

    path = tiny_checkpoint_factory(family="qwen3", ratio=4, window=16)
    table = profile(["--checkpoint", str(path), "--tokens", "40", "--dtype", "bfloat16", "--top", "5"])
    assert "aten::" in table and "Self CPU" in table
    assert capsys.readouterr().out.startswith("40 tokens, bfloat16, 1 threads")
