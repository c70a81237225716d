"""Pictures of the studio's results, without widgets: plotly figures (latent map, latent
statistics, TTFT and memory against context length) and HTML strips of the document's
chunks (plain, with EXPAND highlights, or coloured by reconstruction fidelity)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.engine.measure import MiB
from app.studio.documents import Cell
from app.studio.latent_analysis import PointSet, Projection

SYMBOLS = ("circle", "diamond", "square", "triangle-up", "x")
METHOD_COLOURS = {"lclm": "#1f77b4", "expand": "#17becf", "full": "#d62728"}
ROUND_COLOURS = ("#ff7f0e", "#e377c2", "#9467bd", "#8c564b", "#bcbd22")


# ---- strips ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StripCell:
    label: str
    weight: int  # relative width (tokens)
    colour: str
    tooltip: str
    selected: bool = False


STRIP_ROW_CELLS = 50  # cells per row of a strip: a long document's hundreds of chunks wrap into rows


def strip_html(cells: Sequence[StripCell], caption: str = "") -> str:
    """Rows of at most STRIP_ROW_CELLS cells, widths proportional to their weights within a row; the
    tooltip names each cell. Where there is more than one row, each starts with its cells' numbers."""
    rows = [cells[first : first + STRIP_ROW_CELLS] for first in range(0, len(cells), STRIP_ROW_CELLS)] or [[]]
    html_rows = []
    for number, row in enumerate(rows):
        parts = []
        if len(rows) > 1:
            first, last = number * STRIP_ROW_CELLS + 1, number * STRIP_ROW_CELLS + len(row)
            parts.append(f'<div class="lclm-row-label" style="flex:0 0 64px;font-size:11px;line-height:34px;'
                         f'color:#555">{first}-{last}</div>')
        for cell in row:
            border = "2px solid #111" if cell.selected else "1px solid #fff"
            parts.append(
                f'<div class="lclm-cell" title="{html.escape(cell.tooltip)}" style="flex:{max(1, cell.weight)} 1 0;'
                f"min-width:3px;background:{cell.colour};border:{border};height:34px;overflow:hidden;"
                f'font-size:11px;line-height:34px;text-align:center;color:#111;white-space:nowrap">'
                f"{html.escape(cell.label)}</div>"
            )
        if len(rows) > 1 and len(row) < STRIP_ROW_CELLS:  # the last row keeps the others' scale
            mean_weight = sum(max(1, c.weight) for c in cells) / len(cells)
            parts.append(f'<div style="flex:{mean_weight * (STRIP_ROW_CELLS - len(row)):.0f} 1 0"></div>')
        html_rows.append(f'<div class="lclm-strip" style="display:flex;width:100%">{"".join(parts)}</div>')
    caption_html = ""
    if caption:
        caption_html = f'<div style="font-size:12px;color:#555;margin-top:4px">{html.escape(caption)}</div>'
    return "".join(html_rows) + caption_html


def document_strip(cells: Sequence[Cell], expanded: dict[int, int] | None = None) -> str:
    """The document as a strip of chunks (numbered from 1, widths by decoder tokens); `expanded`
    maps a chunk number to the EXPAND round that read it, and those chunks are lit."""
    expanded = expanded or {}
    strip = []
    for cell in cells:
        tooltip = (f"chunk {cell.index}: {cell.tokens} tokens, characters {cell.start_char}-{cell.end_char}\n"
                   f"{cell.preview}")
        if cell.index in expanded:
            round_number = expanded[cell.index]
            colour = ROUND_COLOURS[(round_number - 1) % len(ROUND_COLOURS)]
            strip.append(StripCell(f"{cell.index} (r{round_number})", cell.tokens, colour,
                                   f"expanded in round {round_number}\n{tooltip}", selected=True))
        else:
            colour = "#dfe7f1" if cell.index % 2 == 1 else "#c9d6e6"
            strip.append(StripCell(str(cell.index), cell.tokens, colour, tooltip))
    caption = f"{len(cells)} chunks"
    if expanded:
        caption += "; expanded: " + ", ".join(f"chunk {i} (round {r})" for i, r in sorted(expanded.items()))
    return strip_html(strip, caption)


def accuracy_colour(accuracy: float) -> str:
    """Red (0) through yellow to green (1)."""
    return f"hsl({int(120 * max(0.0, min(1.0, accuracy)))}, 70%, 60%)"


def fidelity_strip(chunks: Sequence[dict], selected: int | None = None, caption: str = "") -> str:
    """Reconstruction fidelity per chunk: dicts with index, token_accuracy, reference_tokens."""
    cells = [
        StripCell(f"{c['index']}: {c['token_accuracy']:.0%}", c["reference_tokens"],
                  accuracy_colour(c["token_accuracy"]),
                  f"chunk {c['index']}: token accuracy {c['token_accuracy']:.1%} of {c['reference_tokens']} tokens",
                  selected=c["index"] == selected)
        for c in chunks
    ]
    return strip_html(cells, caption)


# ---- latent map and statistics -------------------------------------------------------------------
COLOUR_BY = ("position", "chunk", "content")  # what the latent map's colours show
CONTENT_COLOURS = {"numbers": "#d62728", "code": "#9467bd", "names": "#ff7f0e", "prose": "#1f77b4",
                   "punctuation and space": "#7f7f7f"}


def latent_map_figure(projection: Projection, title: str = "", colour_by: str = "position") -> go.Figure:
    """Scatter of the projected sets; hover shows the source text. Colours: the position of each
    point's text in the document (a continuous scale), the EXPAND chunk it is from, or its content
    class (app.studio.latent_analysis.content_class: numbers, code, names, prose, punctuation)."""
    if colour_by not in COLOUR_BY:
        raise ValueError(f"colour_by must be one of {', '.join(COLOUR_BY)}, got {colour_by!r}")
    figure = go.Figure()
    numbered = list(enumerate(zip(projection.sets, projection.coords)))
    for number, (points, coords) in reversed(numbered):  # the first set (the latents asked for) on top
        chunks = points.chunks or [0] * len(points.texts)
        customdata = np.stack([np.round(points.positions * 100, 1), np.asarray(points.texts, dtype=object),
                               np.asarray(points.classes, dtype=object), np.asarray(chunks)], axis=-1)
        hover = ("%{customdata[0]}% into the document" + (", chunk %{customdata[3]}" if points.chunks else "")
                 + " (%{customdata[2]})<br>%{customdata[1]}<extra>" + points.name + "</extra>")
        style = dict(symbol=SYMBOLS[number % len(SYMBOLS)], size=9 if number == 0 else 6,
                     opacity=0.9 if number == 0 else 0.5, line=dict(width=0.5, color="#333"))
        if colour_by == "content":
            classes = np.asarray(points.classes)
            for name, colour in CONTENT_COLOURS.items():
                mask = classes == name
                if mask.any():
                    figure.add_trace(go.Scattergl(
                        x=coords[mask, 0], y=coords[mask, 1], mode="markers", name=f"{name} ({points.name})",
                        marker=dict(color=colour, **style), customdata=customdata[mask], hovertemplate=hover))
            continue
        colour = points.positions if colour_by == "position" or not points.chunks else [int(c) for c in points.chunks]
        figure.add_trace(go.Scattergl(
            x=coords[:, 0], y=coords[:, 1], mode="markers", name=points.name,
            marker=dict(color=colour, coloraxis="coloraxis", **style), customdata=customdata, hovertemplate=hover,
        ))
    if colour_by == "chunk":
        top = max([max(p.chunks) for p in projection.sets if p.chunks] or [1])
        coloraxis = dict(colorscale="Turbo", cmin=1, cmax=max(2, top), colorbar=dict(title="chunk", dtick=1))
    else:
        coloraxis = dict(colorscale="Viridis", cmin=0, cmax=1, colorbar=dict(title="position", tickformat=".0%"))
    figure.update_layout(
        title=title or f"{projection.method} of the latents", height=520, margin=dict(l=10, r=10, t=50, b=10),
        coloraxis=coloraxis, legend=dict(orientation="h", y=-0.05, traceorder="reversed"),
        xaxis=dict(showticklabels=False), yaxis=dict(showticklabels=False),
    )
    return figure


def latent_stats_figure(series: Sequence[tuple[PointSet, dict[str, np.ndarray]]]) -> go.Figure:
    """Norm and cosine similarity to the previous latent, along the document, per set."""
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                           subplot_titles=("latent norm", "cosine similarity to the previous latent"))
    for points, stats in series:
        x = points.positions
        figure.add_trace(go.Scatter(x=x, y=stats["norm"], mode="lines+markers", name=f"{points.name} norm",
                                    legendgroup=points.name), row=1, col=1)
        figure.add_trace(go.Scatter(x=x, y=stats["cos_prev"], mode="lines+markers", name=f"{points.name} cosine",
                                    legendgroup=points.name), row=2, col=1)
    figure.update_xaxes(title_text="position in the document", tickformat=".0%", row=2, col=1)
    figure.update_layout(height=480, margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h", y=-0.15))
    return figure


# ---- measurements -----------------------------------------------------------------------------------
def sweep_figure(rows: Sequence[dict]) -> go.Figure:
    """TTFT and peak memory against context length, one line per method (rows from a sweep)."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=("TTFT (ms)", "peak memory above weights (MiB)"))
    rows = [r for r in rows if "error" not in r]  # lengths a method could not read
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["tokens"])
        colour = METHOD_COLOURS.get(method.split(" ")[0])
        tokens = [r["tokens"] for r in mine]
        figure.add_trace(go.Scatter(x=tokens, y=[r["ttft_ms"] for r in mine], mode="lines+markers", name=method,
                                    legendgroup=method, line=dict(color=colour)), row=1, col=1)
        figure.add_trace(go.Scatter(x=tokens, y=[r["peak_mem_above_weights_bytes"] / MiB for r in mine],
                                    mode="lines+markers", name=method, legendgroup=method, showlegend=False,
                                    line=dict(color=colour)), row=1, col=2)
    figure.update_xaxes(title_text="context length (tokens)")
    figure.update_layout(height=380, margin=dict(l=10, r=10, t=40, b=10),
                         title=None if rows else "press “Sweep” to measure the current document at several lengths")
    return figure
