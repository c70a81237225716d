"""Latents tab: a UMAP map of the latent tokens (optionally with other ratios and the source
tokens' decoder embeddings), and latent norms and neighbour similarity along the document."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from app.settings import RATIOS
from views.common import MODEL_SLOT, Shared, progress_callback, user_errors


def build() -> SimpleNamespace:
    gr.Markdown("Each point is one latent token, coloured by where its text sits in the document; "
                "hover to read the text it stands for.")
    with gr.Row():
        other_ratios = gr.CheckboxGroup([(f"1:{r}", r) for r in RATIOS], value=[], label="Also map these ratios",
                                        elem_id="other-ratios")
        source = gr.Checkbox(False, label="Overlay the decoder's embeddings of the source tokens",
                             elem_id="show-source")
        draw = gr.Button("Draw map", variant="primary", elem_id="draw-map")
    summary = gr.Markdown(elem_id="latent-summary")
    latent_map = gr.Plot(label="Latent map", elem_id="latent-map")
    stats = gr.Plot(label="Along the document", elem_id="latent-stats")
    return SimpleNamespace(other_ratios=other_ratios, source=source, draw=draw, summary=summary,
                           latent_map=latent_map, stats=stats)


def bind(ui: SimpleNamespace, shared: Shared, workspace) -> None:
    @user_errors
    def latent_map(document: str | None, family: str, ratio: int, pooling: str, other_ratios: list[int],
                   show_source: bool, progress=gr.Progress()):
        variant = workspace.variant(family, ratio, pooling)
        result = workspace.latent_map(document, variant, other_ratios or [], show_source, progress_callback(progress))
        points = ", ".join(f"{n:,} {name}" for name, n in result.summary["points"].items())
        text = f"{result.summary['method']} of {points}."
        if result.summary["notes"]:
            text += " " + "; ".join(result.summary["notes"]) + "."
        return text, result.figure, result.stats_figure

    ui.draw.click(latent_map, [shared.document, *shared.model_inputs, ui.other_ratios, ui.source],
                  [ui.summary, ui.latent_map, ui.stats], api_name="latent_map",
                  concurrency_id=MODEL_SLOT, concurrency_limit=1)
