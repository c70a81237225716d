"""The studio's page: `build_app` lays the tabs out (one module of views/ per tab) and wires them together."""

from __future__ import annotations

import gradio as gr

from views import ask, compress, document, latents, metrics, reconstruction
from views.common import Page, Shared

TITLE = "LCLM Studio"
CSS = ".lclm-strip { border-radius: 4px; overflow: hidden; }"


# (title, id, module): each module has build(page) -> its components and bind(ui, page); the
# tabs are built, then bound, in this order (a tab that follows another's events comes after it)
TABS = (("Document", "document", document), ("Compress", "compress", compress), ("Latents", "latents", latents),
        ("Reconstruction", "reconstruction", reconstruction), ("Ask", "ask", ask), ("Metrics", "metrics", metrics))


def build_app(workspace) -> gr.Blocks:
    """The whole UI over a process-wide `app.studio.workspace.Workspace`."""
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nCompress a document into latent tokens, see what they keep and lose, ask with "
                    "EXPAND, and watch time-to-first-token and memory.")
        page = Page(workspace, demo)
        doc_id = gr.State(None)  # the document's sha256: the only per-session state
        with gr.Tabs():
            for title, tab_id, module in TABS:
                with gr.Tab(title, id=tab_id) as tab:
                    page.tabs[tab_id], page.uis[tab_id] = tab, module.build(page)
        choice = page.uis["compress"]  # the model choice every tab reads
        page.shared = Shared(doc_id, choice.family, choice.ratio, choice.pooling)
        for _, tab_id, module in TABS:
            module.bind(page.uis[tab_id], page)

        def forget_session(request: gr.Request):
            workspace.history.forget(request.session_hash)

        demo.unload(forget_session)
    return demo
