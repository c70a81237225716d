"""Results of the quality harness as JSON, a markdown table and a PNG plot
(accuracy against compression ratio, one line per method family)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def ruler_table(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Rows: methods (in order of appearance); columns: each context length, then the mean."""
    lengths = sorted({r["length"] for r in records})
    scores: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        scores[r["method"]][r["length"]].append(r["score"])
    header = ["method"] + [f"{n} tok" for n in lengths] + ["mean", "positions"]
    positions: dict[str, list[int]] = defaultdict(list)
    for r in records:
        positions[r["method"]].append(r["positions"])
    rows = []
    for method, by_length in scores.items():
        values = [v for n in lengths for v in by_length[n]]
        rows.append([method] + [f"{100 * sum(by_length[n]) / len(by_length[n]):.1f}" for n in lengths]
                    + [f"{100 * sum(values) / len(values):.1f}",
                       f"{sum(positions[method]) / len(positions[method]):.0f}"])
    return header, rows


SINGLE_NEEDLE = "niah_single"


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def task_table(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Question answering per method: accuracy per task, the mean, and each as a share of full
    context's on the same cases (the targets' measure); for EXPAND, how often its first expansion
    names a chunk that holds the answer."""
    tasks = sorted({r["task"] for r in records})
    by: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by[r["method"]][r["task"]].append(r["score"])
    full = next((m for m in by if m.startswith("full context")), None)

    def share(value: float, reference: float) -> str:
        return f"{100 * value / reference:.0f}%" if full and reference > 0 else "-"

    header = ["method"] + tasks + ["mean", "of full context", f"{SINGLE_NEEDLE} of full", "EXPAND first hit"]
    rows = []
    for method, scores in by.items():
        overall = mean([v for t in tasks for v in scores[t]])
        single = mean(scores[SINGLE_NEEDLE])
        hits = [bool(set(r["first_expanded"]) & set(r["holding"])) for r in records
                if r["method"] == method and r.get("holding") and "first_expanded" in r]
        rows.append([method] + [f"{100 * mean(scores[t]):.0f}" for t in tasks] + [
            f"{100 * overall:.1f}", share(overall, mean([v for t in tasks for v in by[full][t]]) if full else 0),
            share(single, mean(by[full][SINGLE_NEEDLE]) if full else 0),
            f"{sum(hits)}/{len(hits)}" if hits else "-"])
    return header, rows


def expand_table(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per EXPAND case: the rounds it used and the chunks (numbered from 1) it read."""
    header = ["method", "task", "length", "example", "score", "rounds", "chunks read", "first read", "holding",
              "of"]
    rows = [[r["method"], r["task"], str(r["length"]), str(r["example"]), f"{100 * r['score']:.0f}",
             str(r["rounds"]), ", ".join(map(str, r["expanded"])) or "none",
             ", ".join(map(str, r.get("first_expanded", []))) or "-", ", ".join(map(str, r.get("holding", []))) or "-",
             str(r["chunks"])]
            for r in records if r["kind"] == "expand" and "rounds" in r]
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fidelity_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["ratio", "pooling", "spans", "token accuracy", "BLEU", "ROUGE-L", "trained"]
    return header, [[f"1:{r['ratio']}", r["pooling"], str(r["spans"]), f"{100 * r['token_accuracy']:.1f}",
                     f"{r['bleu']:.1f}", f"{100 * r['rouge_l']:.1f}", str(r["trained"])] for r in rows]


def plot(records: list[dict], path: Path, title: str) -> None:
    """Mean RULER accuracy against the compression ratio; one line per method family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        points[r["family"]][r["ratio"]].append(r["score"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family, by_ratio in points.items():
        ratios = sorted(by_ratio)
        accuracy = [100 * sum(by_ratio[n]) / len(by_ratio[n]) for n in ratios]
        style = {"marker": "o"} if len(ratios) > 1 else {"marker": "*", "markersize": 12, "linestyle": "none"}
        ax.plot(ratios, accuracy, label=family, **style)
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 4, 8, 16], labels=["1 (none)", "1:4", "1:8", "1:16"])
    ax.set_xlabel("compression (context tokens per kept position)")
    ax.set_ylabel("RULER-style accuracy (%)")
    ax.set_ylim(-5, 105)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out: Path, result: dict) -> dict[str, Path]:
    """quality.json, quality.md and quality.png under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "quality.json", "markdown": out / "quality.md", "png": out / "quality.png"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    note = result["note"]
    parts = [f"# Quality: {result['checkpoint']}", "", note, "", f"Settings: `{json.dumps(result['settings'])}`", ""]
    if result.get("fidelity"):
        parts += ["## Reconstruction fidelity (validation text)", "", markdown(*fidelity_table(result["fidelity"])), ""]
    if result.get("ruler"):
        parts += ["## RULER-style synthetic suite (accuracy %, evaluation seeds)", "",
                  markdown(*ruler_table(result["ruler"])), "",
                  "## Question answering per task (accuracy %; share of full context's on the same cases)", "",
                  markdown(*task_table(result["ruler"])), ""]
        expand = expand_table(result["ruler"])
        if expand[1]:
            parts += ["## EXPAND per case (rounds used, chunks read)", "", markdown(*expand), ""]
        state = "trained" if result.get("trained") else "UNTRAINED adapters: a harness check, not a quality result"
        plot(result["ruler"], paths["png"], f"{result['checkpoint']} ({state})")
    paths["markdown"].write_text("\n".join(parts))
    return paths
