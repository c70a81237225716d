"""The studio's app/ logic without a server: catalog, documents, latent inspection, token
diff, baselines, run history, figures, the workspace's streamed answers, and error mapping."""

import math

import gradio as gr
import numpy as np
import pytest
import torch

from app.engine.answer import Answer
from app.engine.measure import Measurement
from app.engine.models import share_weights
from app.engine.service import AskRequest, Studio
from app.engine.settings import Settings
from app.studio import figures, latent_analysis
from app.studio.catalog import CHECKPOINT_FAMILY, EMBEDDED_FAMILY, Catalog, Variant, build_catalog
from app.studio.documents import Cell, DocumentStore
from app.studio.history import COLUMNS, RunHistory, run_row, to_csv
from app.studio.latent_analysis import latent_statistics, pca, project, token_diff, token_pieces
from app.studio.workspace import Workspace, sweep_lengths
from model.checkpoint import has_layout
from model.embedded import embedded_config, trained_dir
from model.errors import OUT_OF_MEMORY, OutOfMemory, UserError
from tests.studio.conftest import DOCUMENT
from views.common import user_errors


@pytest.fixture(scope="module")
def workspace(tiny_checkpoint_factory, tmp_path_factory):
    checkpoints = [str(tiny_checkpoint_factory(ratio=4)), str(tiny_checkpoint_factory(ratio=8))]
    settings = Settings(data_dir=tmp_path_factory.mktemp("home"), device="cpu", chunk_tokens=32)
    return Workspace(Studio(settings), build_catalog(checkpoints))


# ---- catalog ------------------------------------------------------------------------------
def test_catalog_offers_the_checkpoints_first_then_every_embedded_variant(workspace):
    catalog = workspace.catalog
    assert catalog.families() == [CHECKPOINT_FAMILY, EMBEDDED_FAMILY]
    assert (catalog.default.ratio, catalog.default.pooling) == (4, "mean")
    assert catalog.ratios(CHECKPOINT_FAMILY) == [4, 8] and catalog.ratios(EMBEDDED_FAMILY) == [4, 8, 16]
    # an embedded variant says it is untrained exactly when no trained weights ship for it
    for ratio in (4, 8, 16):
        for label, pooling in catalog.poolings(EMBEDDED_FAMILY, ratio):
            shipped = has_layout(trained_dir(embedded_config(ratio, pooling)))
            assert label.endswith("(untrained)") is not shipped, (ratio, label)
    assert "concat" in dict(catalog.poolings(EMBEDDED_FAMILY, 4)).values()
    assert catalog.sibling(catalog.default, 8).ratio == 8 and catalog.sibling(catalog.default, 16) is None
    with pytest.raises(UserError, match="offers: 1:4 mean, 1:8 mean"):
        catalog.find(CHECKPOINT_FAMILY, 16, "mean")


def test_two_checkpoints_of_one_variant_are_refused(tiny_checkpoint):
    with pytest.raises(UserError, match="both 1:4 mean"):
        build_catalog([str(tiny_checkpoint), str(tiny_checkpoint)])


def test_sibling_prefers_the_same_pooling():
    variants = [Variant("f", "x", 4, "mean", True), Variant("f", "y", 8, "concat", False),
                Variant("f", "z", 8, "mean", False)]
    assert Catalog(variants).sibling(variants[0], 8).spec == "z"


def test_comparisons_and_the_default_pick_the_best_trained_variant():
    """Like for like: another ratio's control picks that ratio's trained variant with the best
    reported reconstruction, not the untrained one with the same pooling; the default is the
    family's best trained variant, wherever it stands in display order."""
    variants = [Variant("f", "a", 16, "mean", True, 0.2), Variant("f", "b", 16, "concat", False),
                Variant("f", "c", 4, "mean", True, 0.1), Variant("f", "d", 4, "concat", True, 0.9)]
    catalog = Catalog(variants)
    assert catalog.default.spec == "d"
    assert catalog.sibling(catalog.default, 16).spec == "a"  # trained mean, not untrained concat
    assert catalog.sibling(variants[0], 4).spec == "d"  # the better card, not the same pooling
    assert catalog.best("f", 8) is None


def test_the_embedded_default_is_the_shipped_variant_with_the_best_card():
    from model.embedded import best_variant, shipped_quality

    catalog = build_catalog()
    shipped = {(v.ratio, v.pooling): v.quality for v in catalog.variants if v.trained}
    if not shipped:
        pytest.skip("no trained embedded weights ship")
    best = max(shipped, key=lambda key: shipped[key] if shipped[key] is not None else -1.0)
    assert (catalog.default.ratio, catalog.default.pooling) == best == best_variant()
    for ratio in (4, 8, 16):  # a ratio alone: that ratio's best trained pooling
        at_ratio = {p: q for (r, p), q in shipped.items() if r == ratio and q is not None}
        if at_ratio:
            assert best_variant(ratio) == (ratio, max(at_ratio, key=at_ratio.get))
            assert shipped_quality(*best_variant(ratio)) == max(at_ratio.values())


# ---- documents ----------------------------------------------------------------------------------
def test_document_store_keeps_ids_and_evicts_the_oldest(tmp_path):
    store = DocumentStore(max_documents=2)
    first = store.add("one")
    store.add("two")
    store.add("three")
    with pytest.raises(UserError, match="no document loaded"):
        store.get(first.sha256)
    with pytest.raises(UserError, match="no document loaded"):
        store.get(None)
    path = tmp_path / "page.html"
    path.write_text("<html><body><p>Hello</p><script>x()</script></body></html>")
    document = store.load("ignored when a file is given", str(path))
    assert (document.text, document.name) == ("Hello", "page.html")


def test_an_upload_read_before_asks_to_be_uploaded_again(workspace, tmp_path):
    variant = workspace.catalog.default
    gone = tmp_path / "report.txt"  # the studio deletes each upload once it has read it
    with pytest.raises(UserError, match=r"^report\.txt was already read and removed; upload the file again$"):
        workspace.load_document(None, str(gone), variant)


def test_layout_cuts_windows_and_chunks(workspace):
    document, layout = workspace.load_document(DOCUMENT, None, workspace.catalog.default)
    assert layout.windows == math.ceil(layout.tokens / 16) and layout.latents == math.ceil(layout.tokens / 4)
    assert [c.index for c in layout.cells] == list(range(1, layout.chunks + 1)) and layout.chunks > 1
    assert all(0 < c.tokens <= 32 for c in layout.cells)  # LCLM_STUDIO_CHUNK_TOKENS of these tests
    assert all(a.end_char <= b.start_char and not document.text[a.end_char:b.start_char].strip()
               for a, b in zip(layout.cells, layout.cells[1:]))
    assert document.text[layout.cells[0].start_char:layout.cells[0].end_char].startswith("The quick")


# ---- latent inspection -----------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("7294 1 2 330-918", "numbers"), ("def f(x): return x[0] == y_1;", "code"),
    ("Debian Project Leader Sam Hartman", "names"), ("the grass is green and the sky", "prose"),
    (" .,;  ", "punctuation and space")])
def test_content_class_by_surface_rules(text, expected):
    from app.studio.latent_analysis import content_class

    assert content_class(text) == expected


def test_chunk_of_a_character():
    from app.studio.latent_analysis import chunk_of

    starts = [0, 100, 250]
    assert [chunk_of(c, starts) for c in (0, 99, 100, 249, 250, 10_000)] == [1, 1, 2, 2, 3, 3]


def test_latent_map_colours_by_position_chunk_or_content():
    from app.studio.latent_analysis import PointSet, Projection

    points = PointSet("latents", np.zeros((3, 4), np.float32), np.array([0.1, 0.5, 0.9], np.float32),
                      ["the sky is blue", "12 345 678", "def f(): return 1"], chunks=[1, 1, 2])
    projection = Projection([points], [np.zeros((3, 2), np.float32)], "PCA")
    assert list(figures.latent_map_figure(projection).data[0].marker.color) == pytest.approx([0.1, 0.5, 0.9])
    assert list(figures.latent_map_figure(projection, colour_by="chunk").data[0].marker.color) == [1, 1, 2]
    by_content = figures.latent_map_figure(projection, colour_by="content")
    assert sorted(t.name for t in by_content.data) == ["code (latents)", "numbers (latents)", "prose (latents)"]
    with pytest.raises(ValueError, match="colour_by"):
        figures.latent_map_figure(projection, colour_by="size")


def test_latent_statistics_shapes_and_values():
    latents = torch.tensor([[3.0, 4.0], [3.0, 4.0], [-3.0, -4.0]])  # [3, 2]
    stats = latent_statistics(latents)
    assert np.allclose(stats["norm"], [5, 5, 5])
    assert math.isnan(stats["cos_prev"][0]) and np.allclose(stats["cos_prev"][1:], [1, -1])
    assert np.allclose(stats["cos_next"][:2], [1, -1]) and math.isnan(stats["cos_next"][2])


def test_few_points_use_pca():
    """(UMAP itself runs in the API and browser tests, where the server has compiled it.)"""
    coords, method = project(np.eye(4, 6, dtype=np.float32))
    assert method == "PCA" and coords.shape == (4, 2)
    assert pca(np.ones((1, 3), dtype=np.float32)).shape == (1, 2)


def test_token_diff_covers_both_texts(workspace):
    tokenizer = workspace.model(workspace.catalog.default).decoder_tokenizer
    original = "The vault code is 5521. The grass is green."
    reconstructed = "The vault code is 1234. The grass is green and blue."
    ids, pieces = token_pieces(tokenizer, original)
    assert "".join(pieces) == original and len(pieces) == len(ids)
    spans = token_diff(tokenizer, original, reconstructed)
    assert "".join(t for t, label in spans if label != "added") == original
    assert "".join(t for t, label in spans if label in ("kept", "added")) == reconstructed
    assert {label for _, label in spans} >= {"kept", "changed", "added"}
    assert token_diff(tokenizer, original, original) == [(original, "kept")]


@pytest.mark.slow
def test_latent_map_of_two_ratios_and_the_source_tokens(workspace, monkeypatch):
    monkeypatch.setattr(latent_analysis, "UMAP_MIN_POINTS", 10**9)  # PCA: spare this process UMAP's JIT
    document, _ = workspace.load_document(DOCUMENT, None, workspace.catalog.default)
    result = workspace.latent_map(document.sha256, workspace.catalog.default, [8, 16], show_source_tokens=True)
    assert list(result.summary["points"]) == ["latents 1:4 mean", "latents 1:8 mean",
                                              "source tokens (decoder embeddings)"]
    assert result.summary["notes"] == ["1:16 left out: --checkpoint does not offer it"]
    assert result.summary["method"] == "PCA"


# ---- answers, baselines, history -------------------------------------------------------------------
@pytest.mark.slow
def test_ask_streams_states_and_records_the_run(workspace):
    document, _ = workspace.load_document(DOCUMENT, None, workspace.catalog.default)
    states = list(workspace.ask("session-a", document.sha256, "What is the vault code?", workspace.catalog.default,
                                method="expand", baselines=["full", "snapkv"], max_new_tokens=4))
    final = states[-1]
    main, full, kvpress = final.methods
    for run in final.methods:  # done, then whatever the reader must be told (a forced round, an empty answer)
        assert run.status == "; ".join(["done", *run.answer.warnings])
        assert run.text == run.answer.text or (run.answer.empty and run.text.startswith("("))
    assert main.answer.method == "expand" and full.answer.method == "full"
    assert kvpress.name == "SnapKV" and kvpress.answer.method == "snapkv"
    assert main.answer.prompt_profile == "paper" and final.rounds[0]["action"] in ("expand", "demoted")
    assert final.expanded == {n: r["number"] for r in reversed(final.rounds) for n in r["expanded"]}
    assert all(1 <= n <= len(main.answer.expand.chunks) for n in final.expanded)
    assert final.results()[main.name] == main.answer.to_json()  # what the page's JSON view shows
    studio_profile = list(workspace.ask("session-a", document.sha256, "What is the vault code?",
                                        workspace.catalog.default, method="expand", max_new_tokens=2,
                                        prompt_profile="studio"))[-1]
    assert (studio_profile.rounds[0]["forced"] == "EXPAND:"
            and studio_profile.methods[0].answer.prompt_profile == "studio")
    assert [row["method"] for row in workspace.history.rows("session-a")] == [main.name, "full context", "SnapKV",
                                                                              main.name]
    assert workspace.history.rows("session-b") == []
    with pytest.raises(UserError, match="the question is empty"):
        next(workspace.ask("s", document.sha256, "  ", workspace.catalog.default))
    with pytest.raises(UserError, match="answer from the latents with one of lclm, expand"):
        next(workspace.ask("s", document.sha256, "Q?", workspace.catalog.default, method="full"))


def test_kvpress_keeps_the_matched_share_of_the_context(workspace):
    document, _ = workspace.load_document(DOCUMENT, None, workspace.catalog.default)
    variant = workspace.catalog.default
    events = list(workspace.studio.ask(AskRequest(document.text, "What is the code?", "knorm", variant.ratio,
                                                  variant.pooling, variant.spec, 3)))
    result = events[-1].result
    assert result["press_ratio"] == 0.75 and result["ttft_ms"] > 0
    assert result["positions"] < result["prefilled_positions"] / 2  # a quarter of the context, plus the question


def answer_of(**measured) -> Answer:
    """An answer with these measured numbers (the rest plain), as a history row reads it."""
    return Answer(text="x", method="lclm", label="LCLM", question="q", ratio=4, pooling="mean", checkpoint="c",
                  prompt_profile="studio", tokens=10, measurement=Measurement(**measured),
                  precision={"dtype": "float32"})


def test_history_rows_and_csv():
    history = RunHistory(max_sessions=1)
    history.add("a", run_row(answer_of(ttft_ms=1.5, peak_mem_bytes=2**20), "lclm"))
    history.add("b", run_row(answer_of(ttft_ms=2.5), "full context"))
    assert history.rows("a") == []  # dropped: only one session is kept
    assert history.rows("b")[0]["ttft_ms"] == 2.5 and history.rows("b")[0]["dtype"] == "float32"
    csv = to_csv(history.rows("b"))
    assert csv.splitlines()[0] == ",".join(COLUMNS) and "full context" in csv


def test_sweep_lengths_halve_the_document():
    assert sweep_lengths(1000) == [62, 125, 250, 500, 1000]
    assert sweep_lengths(70) == [35, 70] and sweep_lengths(20) == [20]


# ---- figures and errors ------------------------------------------------------------------------------
def test_strips_escape_text_and_mark_expanded_chunks():
    cells = [Cell(1, 8, 0, 10, "<script>alert(1)</script>"), Cell(2, 8, 11, 20, "plain")]
    strip = figures.document_strip(cells, expanded={2: 3})
    assert "<script>" not in strip and "&lt;script&gt;" in strip
    assert "2 (r3)" in strip and "expanded: chunk 2 (round 3)" in strip and ">1</div>" in strip
    assert strip.count("border:2px") == 1  # only the expanded chunk is lit
    fidelity = figures.fidelity_strip([{"index": 0, "token_accuracy": 1.0, "reference_tokens": 5}], selected=0)
    assert "hsl(120" in fidelity and "border:2px" in fidelity


def test_share_weights_reuses_components_and_matches_a_fresh_load(tiny_checkpoint):
    from dataclasses import replace

    from model.checkpoint import parts_from_directory
    from model.config import LCLMConfig
    from model.loading import build_lclm

    parts = parts_from_directory(tiny_checkpoint)
    loaded = build_lclm(parts, device="cpu")
    other = replace(parts, config=LCLMConfig(compression_ratio=8, encoder_window_size=16), adapter_file=None,
                    checkpoint_id="tiny:8:untrained")
    shared = share_weights(loaded, other)
    assert shared.decoder is loaded.decoder and shared.encoder.model is loaded.encoder.model
    ids = loaded.tokenize_document(DOCUMENT[:200]).ids
    assert torch.equal(shared.compress(ids), build_lclm(other, device="cpu").compress(ids))


def test_user_errors_become_one_line_messages():
    @user_errors
    def fails(kind):
        raise {"user": UserError("the document is empty"), "oom": OutOfMemory(),
               "bug": RuntimeError("shape mismatch")}[kind]

    @user_errors
    def streams():
        yield 1
        raise UserError("stopped <b>here</b>")

    with pytest.raises(gr.Error, match="the document is empty"):
        fails("user")
    with pytest.raises(gr.Error, match=OUT_OF_MEMORY):
        fails("oom")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        fails("bug")
    with pytest.raises(gr.Error, match="&lt;b&gt;here"):
        list(streams())


def test_follow_up_summary_compares_first_questions_with_follow_ups():
    from app.studio.history import follow_up_summary

    rows = [run_row(answer_of(ttft_ms=t, prefix_reused_positions=r), m) for m, t, r in [
        ("full context", 900.0, 0), ("full context", 30.0, 500), ("full context", 50.0, 500),
        ("LCLM 1:4 mean", 120.0, 0), ("LCLM 1:4 mean", 100.0, 0)]]
    summary = {row["method"]: row for row in follow_up_summary(rows)}
    assert summary["full context"] == {"method": "full context", "dtype": "float32", "first questions": 1,
                                       "first TTFT ms": 900.0, "follow-ups": 2, "follow-up TTFT ms": 40.0,
                                       "first / follow-up": 22.5}
    assert summary["LCLM 1:4 mean"]["follow-ups"] == 0 and summary["LCLM 1:4 mean"]["first / follow-up"] is None


@pytest.mark.slow
def test_ask_answers_at_other_ratios_side_by_side(workspace):
    """The same method at each other ratio asked for, with that ratio's best variant; ratios the
    family does not offer are left out; the transcript stays the chosen variant's."""
    document, _ = workspace.load_document(DOCUMENT, None, workspace.catalog.default)
    final = list(workspace.ask("session-r", document.sha256, "What is the vault code?", workspace.catalog.default,
                               method="expand", baselines=["full"], max_new_tokens=3, other_ratios=[4, 8, 16]))[-1]
    names = [m.name for m in final.methods]
    assert names == ["LCLM 1:4 mean + EXPAND", "LCLM 1:8 mean + EXPAND", "full context"]
    at_eight = final.methods[1]
    assert at_eight.answer.ratio == 8 and at_eight.answer.method == "expand"
    assert len(final.rounds) == len(final.methods[0].answer.expand.rounds)


def test_a_long_documents_latent_map_is_subsampled_and_says_so(workspace, monkeypatch):
    from app.studio import latent_analysis

    monkeypatch.setattr(latent_analysis, "MAX_MAP_LATENTS", 20)
    monkeypatch.setattr(latent_analysis.subsample, "__defaults__", (20,))
    document, _ = workspace.load_document(DOCUMENT, None, workspace.catalog.default)
    result = workspace.latent_map(document.sha256, workspace.catalog.default)
    drawn = result.summary["points"]["latents 1:4 mean"]
    assert drawn == 20 and "(subsampled)" in result.figure.layout.title.text
    assert any("20 of" in note and "drawn, evenly" in note for note in result.summary["notes"])
    assert len(result.stats_figure.data[0].x) > 20  # the curves along the document keep every latent


def test_a_long_documents_reconstruction_is_read_a_page_at_a_time(workspace):
    document, layout = workspace.load_document(DOCUMENT * 3, None, workspace.catalog.default)
    variant = workspace.catalog.default
    first_page = workspace.reconstruct(document.sha256, variant, max_chunks=2, chunk_tokens=16, chunk=1)
    total = first_page["total_chunks"]
    assert total > 4 and [c["index"] for c in first_page["chunks"]] == [1, 2]
    second = workspace.reconstruct(document.sha256, variant, max_chunks=2, chunk_tokens=16, chunk=4)
    assert [c["index"] for c in second["chunks"]] == [3, 4]  # the page that holds chunk 4
    strip, diff = workspace.chunk_diff(second, variant, 4)
    assert f"over chunks 3-4 of {total}" in strip and diff
    last = workspace.reconstruct(document.sha256, variant, max_chunks=2, chunk_tokens=16, chunk=10**6)
    assert last["chunks"][-1]["index"] == total  # past the end: the last page
    again = workspace.reconstruct(document.sha256, variant, max_chunks=2, chunk_tokens=16, chunk=3)
    assert again is second  # kept: choosing a chunk on a page read before reconstructs nothing


def test_a_strip_of_hundreds_of_chunks_wraps_into_numbered_rows():
    cells = [Cell(i, 10 + i % 7, 0, 1, "text") for i in range(1, 121)]
    strip = figures.document_strip(cells)
    assert strip.count('class="lclm-cell"') == 120 and strip.count('class="lclm-strip"') == 3
    assert [f">{first}-{last}<" in strip for first, last in ((1, 50), (51, 100), (101, 120))] == [True] * 3
    assert figures.document_strip(cells[:50]).count('class="lclm-strip"') == 1  # one row: no row numbers
    assert "lclm-row-label" not in figures.document_strip(cells[:50])


def test_a_long_pdf_of_the_machines_documentation_is_read_and_mapped(workspace, tmp_path):
    """A 40-page PDF of real text: read whole, thousands of latents, the map subsampled and saying
    so, the strip in rows, the reconstruction a page at a time."""
    from bench.long_document import machine_pdf
    from tests.long_inputs import long_text

    data, lines = machine_pdf(long_text(40_000), pages=40)
    path = tmp_path / "handbook.pdf"
    path.write_bytes(data)
    variant = workspace.catalog.default
    document, layout = workspace.load_document(None, str(path), variant)
    read = [line.strip() for line in document.text.splitlines() if line.strip()]
    assert sum(a == b.strip() for a, b in zip(read, lines)) >= 0.95 * len(lines)
    assert layout.latents > latent_analysis.MAX_MAP_LATENTS and layout.chunks > 100
    assert figures.document_strip(layout.cells).count('class="lclm-strip"') == -(-layout.chunks // 50)
    result = workspace.latent_map(document.sha256, variant)
    assert result.summary["points"][f"latents {variant.label}"] == latent_analysis.MAX_MAP_LATENTS
    assert "(subsampled)" in result.figure.layout.title.text
    page = workspace.reconstruct(document.sha256, variant, max_chunks=3, chunk=layout.chunks)
    assert page["chunks"][-1]["index"] == page["total_chunks"] and len(page["chunks"]) <= 3
