"""A tiny rehearsal of both benchmarks with Attention Matching and the quantized KV caches: the
speed benchmark's records (positions follow the ratio; quantization keeps every position and
stores fewer bytes) and the quality suite's RULER cases through the studio's press methods (app.engine.methods)."""

import json
import math

import pytest

from app.engine.service import Studio
from app.engine.settings import Settings
from bench.quality.suite import methods as suite_methods
from bench.quality.suite import ruler_examples, run_ruler
from bench.speed.__main__ import main
from model.training.data.synthetic import Haystack
from tests.tiny_models import CORPUS

pytestmark = pytest.mark.slow  # benchmark runs


def test_speed_rehearsal(tiny_checkpoint_factory, tmp_path, one_thread):
    path = tiny_checkpoint_factory(family="qwen3", ratio=4, window=16)
    data = main(["--preset", "cpu", "--checkpoint", str(path), "--lengths", "48", "--ratios", "4",
                 "--methods", "full", "attention_matching", "quantized_4bit", "quantized_2bit", "--runs", "1",
                 "--new-tokens", "2", "--out-dir", str(tmp_path), "--name", "kv"])
    assert json.loads((tmp_path / "kv.json").read_text()) == data
    records = {r["method"]: r for r in data["records"]}
    assert all(r["status"] == "ok" for r in records.values()), records
    prompt = data["rig"]["prompt_tokens"]
    full = records["full"]["median"]
    assert full["positions"] == 48 + prompt
    matched = records["attention_matching"]
    assert matched["median"]["positions"] < full["positions"] and matched["median"]["compress_ms"] > 0
    four, two = records["quantized_4bit"], records["quantized_2bit"]
    assert four["median"]["positions"] == two["median"]["positions"] == full["positions"]
    assert two["median"]["kv_cache_bytes"] < four["median"]["kv_cache_bytes"] < full["kv_cache_bytes"]


def test_quality_rehearsal(tmp_path, tiny_checkpoint):
    studio = Studio(Settings(data_dir=tmp_path, device="cpu", chunk_tokens=24), checkpoint=str(tiny_checkpoint))
    model = studio.model()
    haystack = Haystack(CORPUS, lambda t: len(model.encoder_tokenizer(t, add_special_tokens=False)["input_ids"]))
    examples = ruler_examples(haystack, ["niah_single"], [96], 1)
    methods = [m for m in suite_methods([4], ["mean"], ["attention_matching", "quantized_4bit"]) if m.is_press]
    assert [(m.name, m.ratio) for m in methods] == [("attention_matching 1:4", 4), ("quantized_4bit", 1)]
    records = run_ruler(studio, methods, examples, max_new_tokens=3, expand_new_tokens=3)
    assert [r["method"] for r in records] == ["attention_matching 1:4", "quantized_4bit"]
    assert [r["family"] for r in records] == ["Attention Matching", "KV 4-bit"]
    compacted, quantized = records
    assert compacted["positions"] < quantized["positions"]
    assert all(math.isfinite(r["score"]) for r in records if "score" in r)
