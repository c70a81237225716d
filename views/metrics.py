"""Metrics tab: live readouts of the answer in progress, this session's runs (CSV/JSON export),
and TTFT and peak memory against context length, LCLM vs full context, from a sweep."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pandas as pd

from app.studio.history import COLUMNS, FOLLOW_UP_COLUMNS, follow_up_summary
from views.ask import readout_table
from views.common import MODEL_SLOT, Page, progress_callback, user_errors


def build(page: Page) -> SimpleNamespace:
    live = gr.Dataframe(readout_table([]), label="Live readouts (the answer in progress, each method side by side)",
                        interactive=False, elem_id="metrics-live")
    with gr.Row():
        refresh = gr.Button("Refresh", elem_id="refresh-metrics")
        csv = gr.DownloadButton("Export CSV", elem_id="export-csv")
        json = gr.DownloadButton("Export JSON", elem_id="export-json")
    history = gr.Dataframe(pd.DataFrame(columns=COLUMNS), label="This session's runs", interactive=False,
                           max_height=360, max_chars=48, elem_id="history")
    follow_ups = gr.Dataframe(pd.DataFrame(columns=FOLLOW_UP_COLUMNS), interactive=False, elem_id="follow-ups",
                              label="First question vs follow-up about the same document (median TTFT; a follow-up "
                                    "reuses the document's KV cache and prefills only its question)")
    gr.Markdown("**Sweep**: TTFT and peak memory of the LCLM (cold, no latent cache) and of the full context "
                "on the first L tokens of the current document, for several L.")
    sweep = gr.Button("Sweep", variant="primary", elem_id="sweep")
    chart = gr.Plot(label="TTFT and peak memory against context length", elem_id="sweep-chart",
                    visible=False)  # shown once this session has a sweep
    return SimpleNamespace(live=live, refresh=refresh, csv=csv, json=json, history=history, follow_ups=follow_ups,
                           sweep=sweep, chart=chart)


def bind(ui: SimpleNamespace, page: Page) -> None:
    """The history refreshes on its button, when the tab is opened and after every answer."""
    shared, workspace, tab = page.shared, page.workspace, page.tabs["metrics"]
    def metrics(request: gr.Request):
        session = request.session_hash
        rows, chart = workspace.metrics(session)
        chart = gr.Plot(value=chart, visible=bool(workspace.history.sweep(session)))
        return (pd.DataFrame(rows, columns=COLUMNS, dtype=object), chart, str(workspace.export(session, "csv")),
                str(workspace.export(session, "json")),
                pd.DataFrame(follow_up_summary(rows), columns=FOLLOW_UP_COLUMNS, dtype=object))

    outputs = [ui.history, ui.chart, ui.csv, ui.json, ui.follow_ups]
    ui.refresh.click(metrics, None, outputs, api_name="metrics")
    tab.select(metrics, None, outputs, api_name="metrics_on_select", api_visibility="private")
    for event in page.answer_events:
        event.then(metrics, None, outputs, api_name="metrics_after_ask", api_visibility="private")

    @user_errors
    def sweep(document: str | None, family: str, ratio: int, pooling: str, request: gr.Request,
              progress=gr.Progress()):
        variant = workspace.variant(family, ratio, pooling)
        workspace.sweep(request.session_hash, document, variant, progress=progress_callback(progress, unit="runs"))
        return metrics(request)

    ui.sweep.click(sweep, [shared.document, *shared.model_inputs], outputs, api_name="sweep",
                   concurrency_id=MODEL_SLOT, concurrency_limit=1)
