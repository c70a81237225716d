"""The quality harness's RULER-style suite on a tiny checkpoint: EXPAND runs with the paper's
prompt profile and records, per case, the rounds it used and the chunks it read."""

import json

import pytest

from app.engine.service import Studio
from app.engine.settings import Settings
from bench.quality.report import expand_table, task_table
from bench.quality.suite import ScoredMethod, ruler_examples, run_ruler
from model.training.data.synthetic import Haystack
from tests.tiny_models import CORPUS

pytestmark = pytest.mark.slow  # a benchmark run


def test_expand_cases_record_rounds_and_chunks_read(tmp_path, tiny_checkpoint):
    studio = Studio(Settings(data_dir=tmp_path, device="cpu", chunk_tokens=24), checkpoint=str(tiny_checkpoint))
    model = studio.model()
    haystack = Haystack(CORPUS, lambda t: len(model.encoder_tokenizer(t, add_special_tokens=False)["input_ids"]))
    examples = ruler_examples(haystack, ["niah_single"], [96], 1)
    methods = [ScoredMethod("LCLM 1:4 mean", "lclm", 4, "mean"),
               ScoredMethod("LCLM 1:4 mean + EXPAND", "expand", 4, "mean"), ScoredMethod("knorm 1:4", "knorm", 4)]
    records = run_ruler(studio, methods, examples, max_new_tokens=3, expand_new_tokens=3)
    lclm, expand = records[:2]
    assert {r["prompt_profile"] for r in records} == {"paper"} and "rounds" not in lclm
    assert 2 <= expand["rounds"] <= studio.settings.max_expand_rounds + 1  # something read, then an answer
    assert expand["expanded"] and all(1 <= n <= expand["chunks"] for n in expand["expanded"])
    header, rows = expand_table(records)
    assert len(rows) == 1 and rows[0][5] == str(expand["rounds"])
    assert rows[0][6] == ", ".join(map(str, expand["expanded"]))
    chunk = next(c for c in studio.store.chunks(model, examples[0][1].context)
                 if c.start_char <= examples[0][1].answer_offsets[0] < c.end_char)
    assert expand["holding"] == [chunk.number] and expand["first_expanded"] == expand["expanded"][:len(
        expand["first_expanded"])]


def test_the_task_table_gives_each_method_as_a_share_of_full_context():
    def record(method, task, score, **extra):
        return {"method": method, "task": task, "score": score, **extra}

    records = [record("full context", "niah_single", 1.0), record("full context", "niah_single", 1.0),
               record("full context", "kv_retrieval", 0.0), record("full context", "kv_retrieval", 1.0),
               record("LCLM 1:4 concat", "niah_single", 1.0), record("LCLM 1:4 concat", "niah_single", 0.0),
               record("LCLM 1:4 concat", "kv_retrieval", 0.0), record("LCLM 1:4 concat", "kv_retrieval", 0.0),
               record("EXPAND", "niah_single", 1.0, holding=[2], first_expanded=[2, 3]),
               record("EXPAND", "niah_single", 1.0, holding=[4], first_expanded=[1])]
    header, rows = task_table(records)
    assert header[:3] == ["method", "kv_retrieval", "niah_single"]
    table = {row[0]: dict(zip(header, row)) for row in rows}
    assert table["full context"]["mean"] == "75.0" and table["full context"]["of full context"] == "100%"
    assert table["LCLM 1:4 concat"]["of full context"] == "33%"  # 25% of 75%
    assert table["LCLM 1:4 concat"]["niah_single of full"] == "50%"
    assert table["EXPAND"]["EXPAND first hit"] == "1/2" and table["LCLM 1:4 concat"]["EXPAND first hit"] == "-"


def test_a_registered_text_method_gets_its_own_row(monkeypatch):
    """A new answer method that reads the text appears in the RULER table by registering it alone."""
    from app.engine.methods import METHODS, FullContext
    from bench.quality.suite import methods

    class Plain(FullContext):
        name, label = "plain", "plain text"

    before = [m.kind for m in methods([4], ["mean"], [])]
    assert before[0] == "full" and "plain" not in before
    monkeypatch.setitem(METHODS, "plain", Plain())
    rows = {m.kind: m for m in methods([4], ["mean"], [])}
    assert rows["plain"].name == "plain text" and rows["plain"].family == "plain text"


def test_a_registered_latent_method_gets_rows_at_each_ratio_and_a_place_on_the_ask_tab(monkeypatch):
    """A new answer method that reads latents appears in the RULER table (one row per ratio and
    pooling, one plot line per pooling) and in the Ask tab's choice by registering it alone."""
    from app.engine import methods as registry
    from bench.quality.suite import methods
    from views.ask import latent_method_choices

    class Sketch(registry.LatentContext):
        name, label = "sketch", "Sketch"

    assert "sketch" not in [m.kind for m in methods([4, 8], ["mean"], [])]
    monkeypatch.setitem(registry.METHODS, "sketch", Sketch())
    monkeypatch.setattr(registry, "LATENT_METHODS", [*registry.LATENT_METHODS, "sketch"])
    monkeypatch.setattr("views.ask.LATENT_METHODS", registry.LATENT_METHODS)
    rows = [m for m in methods([4, 8], ["mean", "concat"], []) if m.kind == "sketch"]
    assert [(m.name, m.ratio, m.pooling) for m in rows] == [
        ("Sketch 1:4 mean", 4, "mean"), ("Sketch 1:8 mean", 8, "mean"),
        ("Sketch 1:4 concat", 4, "concat"), ("Sketch 1:8 concat", 8, "concat")]
    assert {m.family for m in rows} == {"Sketch mean", "Sketch concat"}
    assert ("Sketch", "sketch") in latent_method_choices()
    lclm_rows = [m.name for m in methods([4], ["mean"], []) if m.kind in ("lclm", "expand")]
    assert lclm_rows == ["LCLM 1:4 mean", "LCLM 1:16 mean + EXPAND"]  # the names the published tables use


def test_the_readme_status_table_is_the_one_made_from_the_shipped_cards():
    """README.md's variant table is bench.status's, made from the registry, the model cards and
    the published suite results (`python -m bench.status --write` after new weights or results)."""
    from bench.status import README, readme_table, table

    assert readme_table(README.read_text(encoding="utf-8")) == table()


def test_the_status_table_follows_the_cards_and_the_results(tmp_path):
    from bench.status import suite_scores, table

    results = tmp_path / "quality.json"
    results.write_text(json.dumps({"ruler": [
        {"method": "full context", "score": 1.0}, {"method": "full context", "score": 0.0},
        {"method": "LCLM 1:4 concat", "score": 0.5}, {"method": "LCLM 1:4 concat", "score": 0.0}]}))
    rows = {line.split(" | ")[0].strip("| "): line for line in table(suite_scores(results)).splitlines()[2:]}
    assert rows["1:4 concat"].endswith("| 25.0% |") and rows["full context (not an LCLM)"].endswith("| 50.0% |")
    assert rows["1:16 mean"].endswith("| not run on the suite |")
    assert suite_scores(tmp_path / "missing.json") == {}
