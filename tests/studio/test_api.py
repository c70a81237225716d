"""The studio's API through gradio_client against `python app.py` on tiny checkpoints:
every named endpoint, a streamed answer with TTFT, a UMAP figure, and clear errors."""

import json
import os
import subprocess
import sys
import time

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import Status

from app.studio.latent_analysis import CONTENT_CLASSES
from tests.studio.conftest import DOCUMENT, ROOT, wait_until

pytestmark = pytest.mark.server

MODEL = ("--checkpoint", 4, "mean")  # family, ratio, pooling
REQUIRED = {"/load_document", "/compress", "/latent_map", "/reconstruct", "/ask", "/metrics"}


@pytest.fixture
def loaded(client):
    """A client session with DOCUMENT loaded."""
    client.predict(DOCUMENT, None, *MODEL, api_name="/load_document")
    return client


def ask(client, question="What is the vault code?", method="lclm", full=False, kvpress="none", max_new_tokens=6):
    job = client.submit(*MODEL, question, method, full, kvpress, max_new_tokens, api_name="/ask")
    job.result()
    return job.outputs()


def test_a_bad_checkpoint_stops_the_start_with_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "app.py", "--checkpoint", str(tmp_path / "missing")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"error: checkpoint {tmp_path / 'missing'} not found: no such "
                                                "directory, and not a model hub id"]


def test_every_event_is_named(client):
    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert REQUIRED <= endpoints, REQUIRED - endpoints


def test_load_document_reports_tokens_and_chunks(client):
    doc_id_text, _, summary, strip, _ = client.predict(DOCUMENT, None, *MODEL, api_name="/load_document")
    assert doc_id_text == DOCUMENT.strip()
    assert "tokens in" in summary and "chunk(s)" in summary and "latents at 1:4" in summary
    assert strip.count('class="lclm-cell"') > 3


@pytest.mark.parametrize("name, data, message", [
    ("broken.pdf", b"%PDF-1.4 this is not really a pdf", "not a readable PDF"),
    ("notes.docx", b"PK\x03\x04", "notes.docx: unsupported file type .docx"),
    ("binary.txt", b"\x00\x01\x02", "binary file"),
])
def test_bad_files_are_clear_errors(client, tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(AppError, match=message):
        client.predict("", handle_file(str(path)), *MODEL, api_name="/upload_document")


def test_uploaded_markdown_is_loaded(client, tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("# Notes\n\n" + DOCUMENT)
    text, _, summary, _, _ = client.predict("", handle_file(str(path)), *MODEL, api_name="/upload_document")
    assert text.startswith("# Notes") and "**notes.md**" in summary


def test_no_document_and_empty_text_are_clear_errors(client):
    with pytest.raises(AppError, match="no document loaded"):
        client.predict(*MODEL, api_name="/compress")
    with pytest.raises(AppError, match="empty"):
        client.predict("   ", None, *MODEL, api_name="/load_document")


def test_compress_then_cache_hit(loaded):
    summary, details = loaded.predict(*MODEL, api_name="/compress")
    assert details["latents"] == -(-details["tokens"] // 4) and details["positions_saved"] > 0
    assert "latents" in summary and "compress" in summary
    summary, again = loaded.predict(*MODEL, api_name="/compress")
    assert again["cached"] is True and "cache **hit**" in summary


def test_a_ratio_the_family_lacks_is_a_clear_error(loaded):
    with pytest.raises(AppError, match="no 1:16 mean variant"):
        loaded.predict("--checkpoint", 16, "mean", api_name="/compress")


@pytest.mark.slow
def test_latent_map_returns_a_umap_figure_with_overlays(loaded):
    _, details = loaded.predict(*MODEL, api_name="/compress")
    summary, figure, stats = loaded.predict(*MODEL, [8, 16], True, api_name="/latent_map")
    assert summary.startswith("UMAP of") and "1:16 left out" in summary
    traces = json.loads(figure["plot"])["data"][::-1]  # drawn last-first, so the asked-for latents are on top
    assert [t["name"] for t in traces] == ["latents 1:4 mean", "latents 1:8 mean", "source tokens (decoder embeddings)"]
    latents = traces[0]
    assert len(latents["customdata"]) == details["latents"]  # one point per latent
    assert all(isinstance(c[1], str) for c in latents["customdata"])  # hover: the source text
    assert len(json.loads(stats["plot"])["data"]) == 4  # norm and cosine for each ratio
    assert "Its latents' text:" in summary
    _, by_content, _ = loaded.predict(*MODEL, [], False, "content", api_name="/latent_map")
    names = [t["name"] for t in json.loads(by_content["plot"])["data"]]
    assert names and all(n.split(" (")[0] in CONTENT_CLASSES and n.endswith("(latents 1:4 mean)") for n in names)
    _, by_chunk, _ = loaded.predict(*MODEL, [], False, "chunk", api_name="/latent_map")
    chunk_trace = json.loads(by_chunk["plot"])["data"][0]
    assert chunk_trace["marker"]["color"] == [c[3] for c in chunk_trace["customdata"]]  # the chunk of each latent
    assert min(chunk_trace["marker"]["color"]) == 1 and max(chunk_trace["marker"]["color"]) > 1


def test_reconstruct_side_by_side_and_select_chunk(loaded):
    outputs = loaded.predict(*MODEL, "8", 3, 0, 1, api_name="/reconstruct")  # 0: the trained chunk length
    left_title, left_strip, left_diff, right_title, right_strip, right_diff, _slider, details = outputs
    assert "1:4 mean: token accuracy" in left_title and "1:8 mean: token accuracy" in right_title
    assert left_strip.count('class="lclm-cell"') == 3 and "border:2px" in left_strip  # chunk 1 selected
    labels = {span["class_or_confidence"] for span in left_diff + right_diff}
    assert labels and labels <= {"kept", "changed", "lost", "added"}
    assert [d["variant"] for d in details] == ["1:4 mean", "1:8 mean"]
    assert all(d["chunk_tokens"] == 32 and d["trained_span"] is None for d in details)  # no card: EXPAND's
    again = loaded.predict(*MODEL, "none", 3, 0, 2, api_name="/select_chunk")
    assert again[3] == "" and again[2] != left_diff


def test_ask_streams_with_ttft_expand_and_baselines(loaded):
    outputs = ask(loaded, method="expand", full=True, kvpress="snapkv")
    assert len(outputs) >= 2  # the first state, then the streamed answer
    lclm, full, kvpress, ttft, readout, strip, transcript, results = outputs[-1][:8]
    rows = {row[0]: dict(zip(readout["headers"], row)) for row in readout["data"]}
    assert set(rows) == {"LCLM 1:4 mean + EXPAND", "full context", "SnapKV"}  # the methods' labels
    assert rows["LCLM 1:4 mean + EXPAND"]["TTFT ms"] > 0 and "TTFT" in ttft
    assert results["LCLM 1:4 mean + EXPAND"]["ttft_ms"] > 0
    assert results["full context"]["positions"] > results["LCLM 1:4 mean + EXPAND"]["latents"]
    lit = results["LCLM 1:4 mean + EXPAND"]["expanded"]
    assert results["LCLM 1:4 mean + EXPAND"]["prompt_profile"] == "paper"
    assert transcript["data"][0][2] in ("expand", "demoted") and lit  # the first round must expand
    assert all(f">{n} (r" in strip for n in lit)  # chunks numbered from 1, the expanded ones lit
    assert rows["SnapKV"]["status"].startswith("done")  # "done; " + what the reader must know, if anything
    assert results["SnapKV"]["positions"] < results["SnapKV"]["prefilled_positions"] / 2
    assert strip.count('class="lclm-cell"') > 3


@pytest.mark.parametrize("baseline, label", [("attention_matching", "Attention Matching"),
                                             ("quantized_4bit", "KV 4-bit"), ("quantized_2bit", "KV 2-bit")])
def test_ask_with_attention_matching_and_quantized_baselines(loaded, baseline, label):
    outputs = ask(loaded, kvpress=baseline, max_new_tokens=3)[-1]
    readout, results = outputs[4], outputs[7]
    rows = {row[0]: dict(zip(readout["headers"], row)) for row in readout["data"]}
    assert (rows[label]["status"].startswith("done") and results[label]["ttft_ms"] > 0
            and results[label]["mode"] == baseline)
    kept, prefilled = results[label]["positions"], results[label]["prefilled_positions"]
    assert kept < prefilled / 2 if baseline == "attention_matching" else kept == prefilled


def test_metrics_history_and_export(loaded, tmp_path):
    ask(loaded, full=True)
    history, chart, csv_path, json_path, follow_ups = loaded.predict(api_name="/metrics")
    assert chart["visible"] is False  # no sweep yet: no empty axes
    methods = [row[1] for row in history["data"]]
    assert methods == ["LCLM 1:4 mean", "full context"]
    assert [row[0] for row in follow_ups["data"]] == methods
    with open(csv_path) as f:
        assert f.readline().startswith("time,method,ratio,tokens,positions,ttft_ms")
    with open(json_path) as f:
        assert len(json.load(f)["runs"]) == 2


def test_sweep_fills_the_chart(loaded):
    history, chart, _, json_path, _ = loaded.predict(*MODEL, api_name="/sweep")
    assert chart["visible"] is True  # hidden until the session has a sweep
    traces = json.loads(chart["value"]["plot"])["data"]
    assert {t["name"] for t in traces} == {"lclm 1:4 mean", "full context"}
    assert len(traces[0]["x"]) >= 3 and traces[0]["x"] == sorted(traces[0]["x"])
    with open(json_path) as f:
        assert {p["method"] for p in json.load(f)["sweep"]} == {"lclm 1:4 mean", "full context"}


@pytest.mark.slow
def test_a_second_user_waits_in_the_queue(studio_url, tmp_path):
    """Model-bound events share one slot: a second request queues, and is told its place."""
    from gradio_client import Client

    first, second = (Client(studio_url, verbose=False, analytics_enabled=False, download_files=str(tmp_path))
                     for _ in range(2))
    for c in (first, second):
        c.predict(DOCUMENT, None, *MODEL, api_name="/load_document")
    long_answer = first.submit(*MODEL, "Tell me everything.", "lclm", True, "none", 400, api_name="/ask")
    wait_until(lambda: long_answer.status().code in (Status.PROCESSING, Status.ITERATING))
    queued = second.submit(*MODEL, api_name="/compress")
    seen = []
    while not queued.done() and not any(s.code == Status.IN_QUEUE and s.rank is not None for s in seen):
        seen.append(queued.status())
        time.sleep(0.02)
    assert not long_answer.done(), "the first answer ended before the second request queued"
    assert any(s.code == Status.IN_QUEUE and s.rank == 0 for s in seen)
    long_answer.result()
    assert queued.result()[1]["latents"] > 0


def test_ask_at_other_ratios_fills_its_own_box(loaded):
    job = loaded.submit(*MODEL, "What is the vault code?", "lclm", False, "none", 3, "checkpoint default", [8],
                        api_name="/ask")
    job.result()
    outputs = job.outputs()[-1]
    at_ratios, results = outputs[8], outputs[7]
    assert at_ratios["visible"] is True and at_ratios["value"].startswith("LCLM 1:8 mean: ")
    assert set(results) == {"LCLM 1:4 mean", "LCLM 1:8 mean"}
    assert outputs[1]["visible"] is False and outputs[2]["visible"] is False  # no full context, no press asked


@pytest.mark.slow
def test_a_long_pdf_through_the_endpoints(client, tmp_path):
    """A 40-page PDF of the machine's documentation, thousands of latents: the upload, compress and
    latent-map endpoints answer, the strip wraps into rows and the map says it is subsampled."""
    from bench.long_document import machine_pdf
    from tests.long_inputs import long_text

    data, _ = machine_pdf(long_text(40_000), pages=40)
    path = tmp_path / "handbook.pdf"
    path.write_bytes(data)
    _, _, summary, strip, _ = client.predict("", handle_file(str(path)), *MODEL, api_name="/upload_document")
    assert "**handbook.pdf**" in summary and strip.count('class="lclm-strip"') > 1
    _, details = client.predict(*MODEL, api_name="/compress")
    assert details["latents"] > 3000
    summary, figure, _ = client.predict(*MODEL, [], False, api_name="/latent_map")
    assert json.loads(figure["plot"])["layout"]["title"]["text"].endswith("(subsampled)")
    assert "3,000 of" in summary
