"""Latents tab: a UMAP map of the latent tokens (optionally with other ratios and the source
tokens' decoder embeddings), and latent norms and neighbour similarity along the document."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from app.engine.settings import RATIOS
from app.studio.figures import COLOUR_BY
from views.common import MODEL_SLOT, Page, progress_callback, user_errors

CAPTION = ("**How to read the map.** UMAP places latents that are similar (cosine) near each other and keeps "
           "neighbourhoods, not distances: how far apart two clusters lie, their sizes and the axes mean nothing. "
           "A cluster says the encoder gives those spans similar vectors, for example all the digits of a table or "
           "all the code; a trail along the position colours says neighbouring text gives neighbouring latents. "
           "It does not show what the decoder can read back from a latent: the Reconstruction tab does. "
           "Content classes come from simple rules on each latent's text (digits, code marks, capitalised words).")


def build(page: Page) -> SimpleNamespace:
    gr.Markdown("Each point is one latent token; hover to read the text it stands for. Colour it by where "
                "its text sits in the document, by the EXPAND chunk it comes from, or by what its text is.")
    with gr.Row():
        colour_by = gr.Radio(list(COLOUR_BY), value="position", label="Colour by", elem_id="colour-by")
        other_ratios = gr.CheckboxGroup([(f"1:{r}", r) for r in RATIOS], value=[], label="Also map these ratios",
                                        elem_id="other-ratios")
        source = gr.Checkbox(False, label="Overlay the decoder's embeddings of the source tokens",
                             elem_id="show-source")
        draw = gr.Button("Draw map", variant="primary", elem_id="draw-map")
    summary = gr.Markdown(elem_id="latent-summary")
    latent_map = gr.Plot(label="Latent map", elem_id="latent-map")
    gr.Markdown(CAPTION, elem_id="latent-caption")
    stats = gr.Plot(label="Along the document", elem_id="latent-stats")
    return SimpleNamespace(other_ratios=other_ratios, source=source, colour_by=colour_by, draw=draw,
                           summary=summary, latent_map=latent_map, stats=stats)


def bind(ui: SimpleNamespace, page: Page) -> None:
    shared, workspace = page.shared, page.workspace
    @user_errors
    def latent_map(document: str | None, family: str, ratio: int, pooling: str, other_ratios: list[int],
                   show_source: bool, colour_by: str = "position", progress=gr.Progress()):
        variant = workspace.variant(family, ratio, pooling)
        result = workspace.latent_map(document, variant, other_ratios or [], show_source, progress_callback(progress),
                                      colour_by or "position")
        points = ", ".join(f"{n:,} {name}" for name, n in result.summary["points"].items())
        text = f"{result.summary['method']} of {points}."
        if result.summary["notes"]:
            text += " " + "; ".join(result.summary["notes"]) + "."
        content = next(iter(result.summary["content"].values()), {})
        if content:
            text += " Its latents' text: " + ", ".join(f"{n} {name}" for name, n in
                                                        sorted(content.items(), key=lambda item: -item[1])) + "."
        return text, result.figure, result.stats_figure

    ui.draw.click(latent_map, [shared.document, *shared.model_inputs, ui.other_ratios, ui.source, ui.colour_by],
                  [ui.summary, ui.latent_map, ui.stats], api_name="latent_map",
                  concurrency_id=MODEL_SLOT, concurrency_limit=1)
