"""Document tab: paste text or upload a file; its tokens, encoder windows and chunks."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from app.studio import figures
from views.common import Page, user_errors


def build(page: Page) -> SimpleNamespace:
    gr.Markdown("Paste a document or upload a file (text, Markdown, HTML or PDF, whatever its name). "
                "It stays on this machine.")
    with gr.Row():
        text = gr.Textbox(label="Document text", lines=12, max_lines=24, elem_id="document-text",
                          placeholder="Paste text here, then press Load")
        # any name: the content decides what the file is, and ingest refuses what is no document
        file = gr.File(label="…or upload a file", type="filepath", elem_id="document-file")
    load = gr.Button("Load document", variant="primary", elem_id="load-document")
    summary = gr.Markdown(elem_id="document-summary")
    strip = gr.HTML(elem_id="document-strip")
    return SimpleNamespace(text=text, file=file, load=load, summary=summary, strip=strip)


def summary_markdown(document, layout, variant) -> str:
    return (
        f"**{document.name}**: {layout.tokens:,} tokens in {layout.windows:,} encoder window(s) of "
        f"{layout.window_size:,}; {layout.chunks:,} chunk(s) for EXPAND; {layout.latents:,} latents at "
        f"{variant.label}. Document id `{document.sha256[:12]}`"
    )


def bind(ui: SimpleNamespace, page: Page) -> None:
    """Loads the document; every other tab's document strip is redrawn with it."""
    shared, workspace = page.shared, page.workspace
    strips = page.offered("strip", by_other_than=ui)

    @user_errors
    def load_document(text: str, path: str | None, family: str, ratio: int, pooling: str):
        variant = workspace.variant(family, ratio, pooling)
        document, layout = workspace.load_document(text, path, variant)
        strip = figures.document_strip(layout.cells)
        return (document.sha256, document.text, None, summary_markdown(document, layout, variant), strip,
                *[strip] * len(strips))

    inputs = [ui.text, ui.file, *shared.model_inputs]
    outputs = [shared.document, ui.text, ui.file, ui.summary, ui.strip, *strips]
    ui.load.click(load_document, inputs, outputs, api_name="load_document")
    ui.file.upload(load_document, inputs, outputs, api_name="upload_document")
