"""Reconstruction tab: the decoder reproduces each chunk from its latents; a fidelity strip over
the document and a token-level diff of the selected chunk, side by side for two ratios."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from app.engine.settings import RATIOS
from views.common import MODEL_SLOT, Page, progress_callback, user_errors

DIFF_COLOURS = {"kept": "#b7e4c7", "changed": "#ffd166", "lost": "#ef476f", "added": "#a0c4ff"}
NO_COMPARISON = "none"


def build(page: Page) -> SimpleNamespace:
    gr.Markdown("Green: kept; yellow: changed (followed, in blue, by what the decoder wrote instead); "
                "red: lost. This is what compression loses.")
    with gr.Row():
        compare = gr.Dropdown([(NO_COMPARISON, NO_COMPARISON)] + [(f"1:{r}", str(r)) for r in RATIOS],
                              value=NO_COMPARISON, label="Side by side with ratio", elem_id="compare-ratio")
        max_chunks = gr.Number(8, precision=0, minimum=0, label="Chunks per page (0: all)",
                               elem_id="max-chunks")
        chunk_tokens = gr.Number(0, precision=0, minimum=0, label="Chunk length in tokens (0: the length the "
                                 "variant was trained to reconstruct)", elem_id="chunk-tokens")
        run = gr.Button("Reconstruct", variant="primary", elem_id="reconstruct")
    chunk = gr.Slider(1, 2, value=1, step=1, label="Chunk (one on another page reconstructs that page)",
                      elem_id="chunk")
    columns = []
    with gr.Row():
        for side in ("left", "right"):
            with gr.Column():
                columns.append(SimpleNamespace(
                    title=gr.Markdown(elem_id=f"reconstruction-{side}-title"),
                    strip=gr.HTML(elem_id=f"fidelity-{side}"),
                    diff=gr.HighlightedText(label="Token diff", color_map=DIFF_COLOURS, combine_adjacent=True,
                                            show_legend=True, elem_id=f"diff-{side}"),
                ))
    with gr.Accordion("Token accuracy per chunk", open=False):
        details = gr.JSON(label="Per chunk", elem_id="reconstruction-details")
    return SimpleNamespace(compare=compare, max_chunks=max_chunks, chunk_tokens=chunk_tokens, run=run, chunk=chunk,
                           columns=columns,
                           details=details)


def bind(ui: SimpleNamespace, page: Page) -> None:
    shared, workspace = page.shared, page.workspace
    catalog = workspace.catalog

    def side(document, variant, max_chunks, chunk_tokens, chunk, progress):
        result = workspace.reconstruct(document, variant, max_chunks or None, progress, chunk_tokens or None, chunk)
        strip, diff = workspace.chunk_diff(result, variant, chunk)
        trained = result.get("trained_span")
        length = f"chunks of {result['chunk_tokens']} tokens" + (
            " (the length it was trained on)" if trained == result["chunk_tokens"]
            else f" (trained on {trained})" if trained else "")
        title = f"### {variant.label}: token accuracy {result['token_accuracy']:.1%}, {length}"
        if result.get("note"):
            title += f"\n*{result['note']}*"
        summary = {"variant": variant.label, "token_accuracy": result["token_accuracy"],
                   "chunk_tokens": result["chunk_tokens"], "trained_span": trained,
                   "chunks": [{k: c[k] for k in ("index", "token_accuracy", "reference_tokens")}
                              for c in result["chunks"]]}
        return result, (title, strip, diff), summary

    @user_errors
    def reconstruct(document: str | None, family: str, ratio: int, pooling: str, compare: str, max_chunks: float,
                    chunk_tokens: float, chunk: float, progress=gr.Progress()):
        variant = workspace.variant(family, ratio, pooling)
        report = progress_callback(progress, unit="chunks")
        result, left, left_summary = side(document, variant, int(max_chunks or 0), int(chunk_tokens or 0),
                                          int(chunk or 1), report)
        right, summaries = ("", "", []), [left_summary]
        if compare and compare != NO_COMPARISON:
            other = catalog.sibling(variant, int(compare))
            if other is None:
                right = (f"### 1:{compare}: not offered by {variant.family}", "", [])
            else:
                _, right, right_summary = side(document, other, int(max_chunks or 0), int(chunk_tokens or 0),
                                               int(chunk or 1), report)
                summaries.append(right_summary)
        last = max(2, result["total_chunks"])  # chunks are numbered from 1; the slider reaches every page
        return (*left, *right, gr.Slider(maximum=last), summaries)

    inputs = [shared.document, *shared.model_inputs, ui.compare, ui.max_chunks, ui.chunk_tokens, ui.chunk]
    outputs = [*[getattr(c, k) for c in ui.columns for k in ("title", "strip", "diff")], ui.chunk, ui.details]
    ui.run.click(reconstruct, inputs, outputs, api_name="reconstruct", concurrency_id=MODEL_SLOT,
                 concurrency_limit=1)
    ui.chunk.release(reconstruct, inputs, outputs, api_name="select_chunk", concurrency_id=MODEL_SLOT,
                     concurrency_limit=1)
