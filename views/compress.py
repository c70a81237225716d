"""Compress tab: pick the model, ratio and pooling; compress the document into latents."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from app.engine.measure import MiB
from app.engine.settings import POOLINGS, RATIOS
from views.common import MODEL_SLOT, Page, progress_callback, user_errors


def ratio_choices(catalog, family: str) -> list[tuple[str, int]]:
    return [(f"1:{r}", r) for r in catalog.ratios(family)]


def build(page: Page) -> SimpleNamespace:
    """Ratio and pooling start with every choice (so that API calls may name any variant; a
    missing one is a clear error); a page narrows them to its model's variants on load."""
    catalog = page.workspace.catalog
    default = catalog.default
    with gr.Row():
        family = gr.Dropdown(catalog.families(), value=default.family, label="Model", elem_id="model-family",
                             info="the embedded default, or checkpoints given with --checkpoint")
        ratio = gr.Radio([(f"1:{r}", r) for r in RATIOS], value=default.ratio, label="Compression ratio",
                         elem_id="ratio")
        pooling = gr.Radio(list(POOLINGS), value=default.pooling, label="Pooling", elem_id="pooling",
                           info="variants without trained weights say (untrained)")
    run = gr.Button("Compress", variant="primary", elem_id="compress")
    summary = gr.Markdown(elem_id="compress-summary")
    details = gr.JSON(label="Details", elem_id="compress-details")
    return SimpleNamespace(family=family, ratio=ratio, pooling=pooling, run=run, summary=summary, details=details)


def summary_markdown(result: dict) -> str:
    if result["cached"]:
        cache = "cache **hit** (no encoder run)"
    elif result.get("cached_windows"):
        cache = f"{result['cached_windows']:,} of {result['windows']:,} windows from the cache, the rest encoded now"
    else:
        cache = "cache miss (encoded now)"
    rate = ""
    if result["compress_ms"]:
        rate = (f" ({result['tokens'] / (result['compress_ms'] / 1000):,.0f} tokens/s, peak memory "
                f"{result['peak_mem_above_weights_bytes'] / MiB:,.0f} MiB above its start)")
    text = (
        f"**{result['latents']:,} latents** from {result['tokens']:,} tokens ({result['variant']}, window "
        f"{result['window']:,}): **{result['positions_saved']:,} decoder positions saved**; compress "
        f"**{result['compress_ms']:,.1f} ms**{rate}; {cache}."
    )
    if result.get("note"):
        text += f"\n\n*Note: {result['note']}.*"
    return text


def bind(ui: SimpleNamespace, page: Page) -> None:
    shared, workspace, demo = page.shared, page.workspace, page.demo
    catalog = workspace.catalog

    def family_changed(family: str, ratio: int, pooling: str):
        ratios = catalog.ratios(family)
        ratio = ratio if ratio in ratios else max(ratios)
        return gr.Radio(choices=ratio_choices(catalog, family), value=ratio), pooling_radio(family, ratio, pooling)

    def pooling_radio(family: str, ratio: int, pooling: str):
        """The poolings offered at this ratio; the current one kept where offered."""
        choices = catalog.poolings(family, ratio)
        values = [value for _, value in choices]
        return gr.Radio(choices=choices, value=pooling if pooling in values else values[0])

    ui.family.change(family_changed, shared.model_inputs, [ui.ratio, ui.pooling], api_name="model_family",
                     queue=False, api_visibility="private")
    ui.ratio.change(pooling_radio, shared.model_inputs, ui.pooling, api_name="model_ratio",
                    queue=False, api_visibility="private")
    demo.load(family_changed, shared.model_inputs, [ui.ratio, ui.pooling], api_name="model_on_load",
              queue=False, api_visibility="private")

    @user_errors
    def compress(document: str | None, family: str, ratio: int, pooling: str, progress=gr.Progress()):
        variant = workspace.variant(family, ratio, pooling)
        result = workspace.compress(document, variant, progress_callback(progress, unit="windows"))
        return summary_markdown(result), result

    ui.run.click(compress, [shared.document, *shared.model_inputs], [ui.summary, ui.details], api_name="compress",
                 concurrency_id=MODEL_SLOT, concurrency_limit=1)
