"""The quality harness's RULER-style suite on a tiny checkpoint: EXPAND runs with the paper's
prompt profile and records, per case, the rounds it used and the chunks it read."""

import pytest

from app.service import Studio
from app.settings import Settings
from bench.quality.report import expand_table
from bench.quality.suite import Method, ruler_examples, run_ruler
from model.training.data.synthetic import Haystack
from tests.tiny_models import CORPUS

pytestmark = pytest.mark.slow  # a benchmark run


def test_expand_cases_record_rounds_and_chunks_read(tmp_path, tiny_checkpoint):
    studio = Studio(Settings(data_dir=tmp_path, device="cpu", chunk_tokens=24), checkpoint=str(tiny_checkpoint))
    model = studio.model()
    haystack = Haystack(CORPUS, lambda t: len(model.encoder_tokenizer(t, add_special_tokens=False)["input_ids"]))
    examples = ruler_examples(haystack, ["niah_single"], [96], 1)
    methods = [Method("LCLM 1:4 mean", "lclm", 4, "mean"), Method("LCLM 1:4 mean + EXPAND", "expand", 4, "mean"),
               Method("knorm 1:4", "knorm", 4)]
    records = run_ruler(studio, methods, examples, max_new_tokens=3, expand_new_tokens=3)
    lclm, expand = records[:2]
    assert {r["prompt_profile"] for r in records} == {"paper"} and "rounds" not in lclm
    assert 2 <= expand["rounds"] <= studio.settings.max_expand_rounds + 1  # something read, then an answer
    assert expand["expanded"] and all(1 <= n <= expand["chunks"] for n in expand["expanded"])
    header, rows = expand_table(records)
    assert len(rows) == 1 and rows[0][5] == str(expand["rounds"])
    assert rows[0][6] == ", ".join(map(str, expand["expanded"]))
