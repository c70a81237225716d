"""The studio's page: `build_app` lays the tabs out (one module of views/ per tab) and wires them together."""

from __future__ import annotations

import gradio as gr

from views import ask, compress, document, latents, metrics, reconstruction
from views.common import Shared

TITLE = "LCLM Studio"
CSS = ".lclm-strip { border-radius: 4px; overflow: hidden; }"


def build_app(workspace) -> gr.Blocks:
    """The whole UI over a process-wide `app.studio.workspace.Workspace`."""
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nCompress a document into latent tokens, see what they keep and lose, ask with "
                    "EXPAND, and watch time-to-first-token and memory.")
        doc_id = gr.State(None)  # the document's sha256: the only per-session state
        with gr.Tabs():
            with gr.Tab("Document", id="document"):
                document_ui = document.build()
            with gr.Tab("Compress", id="compress"):
                compress_ui = compress.build(workspace.catalog)
            with gr.Tab("Latents", id="latents"):
                latents_ui = latents.build()
            with gr.Tab("Reconstruction", id="reconstruction"):
                reconstruction_ui = reconstruction.build()
            with gr.Tab("Ask", id="ask"):
                ask_ui = ask.build(workspace.studio.settings.max_new_tokens)
            with gr.Tab("Metrics", id="metrics") as metrics_tab:
                metrics_ui = metrics.build()
        shared = Shared(doc_id, compress_ui.family, compress_ui.ratio, compress_ui.pooling)
        document.bind(document_ui, shared, workspace, strips=[ask_ui.strip])
        compress.bind(compress_ui, shared, workspace, demo)
        latents.bind(latents_ui, shared, workspace)
        reconstruction.bind(reconstruction_ui, shared, workspace)
        ask_event = ask.bind(ask_ui, shared, workspace, live_readouts=[metrics_ui.live])
        metrics.bind(metrics_ui, shared, workspace, metrics_tab, ask_event)

        def forget_session(request: gr.Request):
            workspace.history.forget(request.session_hash)

        demo.unload(forget_session)
    return demo
