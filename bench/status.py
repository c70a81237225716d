"""The README's table of the embedded default's variants, made from what ships: the variants the
registry offers (model.embedded.variant_order), each trained variant's model card (recipe, CPU
hours, reconstruction before and after) and the RULER-style suite's published results. A test
checks that the README holds exactly this table, so it cannot drift from the weights.

    python -m bench.status            # print the table
    python -m bench.status --write    # put it in README.md between its markers
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from model.embedded import shipped_card, variant_order, variant_rank
from model.pooling import POOLINGS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RULER_RESULTS = ROOT / "bench" / "results" / "quality" / "ruler-trained" / "quality.json"
BEGIN, END = "<!-- status table: python -m bench.status --write -->", "<!-- end of status table -->"
HEADER = ("| variant | weights | reconstruction, teacher-forced (prior -> now) "
          "| reconstruction, free-running (untrained -> now) | answers from latents |\n|---|---|---|---|---|")
NONE = "–"


def suite_scores(path: Path = RULER_RESULTS) -> dict[str, float]:
    """Mean RULER score (%) per method name, from a bench.quality results file ({} if none)."""
    try:
        records = json.loads(path.read_text())["ruler"]
    except OSError:
        return {}
    by_method: dict[str, list[float]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r["score"])
    return {name: 100 * sum(scores) / len(scores) for name, scores in by_method.items()}


def answers_cell(ratio: int, pooling: str, scores: dict[str, float]) -> str:
    lclm, expand = scores.get(f"LCLM 1:{ratio} {pooling}"), scores.get(f"LCLM 1:{ratio} {pooling} + EXPAND")
    if lclm is None and expand is None:
        return "not run on the suite"
    cells = ([f"{lclm:.1f}%"] if lclm is not None else []) + ([f"with EXPAND {expand:.1f}%"] if expand is not None
                                                                else [])
    return ", ".join(cells)


def pair(validation: dict, key: str) -> str:
    return f"{validation['untrained'][key]:.3f} -> {validation['trained'][key]:.3f}"


def table(scores: dict[str, float] | None = None) -> str:
    """The markdown table: trained variants best first (variant_rank), then the untrained ones (a
    pooling untrained at every ratio in one row), then full context."""
    scores = suite_scores() if scores is None else scores
    cards = {(r, p): shipped_card(r, p) for r, p in variant_order()}

    def quality(c: dict | None) -> float | None:
        return c["validation"]["trained"]["free_running"] if c else None

    trained = sorted((v for v, c in cards.items() if c), key=lambda v: variant_rank(True, quality(cards[v])),
                     reverse=True)
    rows = []
    for ratio, pooling in trained:
        c = cards[(ratio, pooling)]
        rows.append(f"| 1:{ratio} {pooling} | trained, `{c['recipe']['name']}`, {c['cpu_hours']:.2f} CPU-hours "
                    f"| {pair(c['validation'], 'teacher_forced')} | {pair(c['validation'], 'free_running')} "
                    f"| {answers_cell(ratio, pooling, scores)} |")
    untrained = [v for v, c in cards.items() if not c]
    ratios_of = {p: [r for r, q in untrained if q == p] for p in POOLINGS}
    every_ratio = {p for p, rs in ratios_of.items() if len(rs) == len({r for r, _ in cards})}
    for ratio, pooling in untrained:
        if pooling not in every_ratio:
            suite = answers_cell(ratio, pooling, scores)
            rows.append(f"| 1:{ratio} {pooling} | **untrained** | {NONE} | {NONE} "
                        f"| {suite if suite != 'not run on the suite' else NONE} |")
    rows += [f"| {p} pooling, any ratio | **untrained** | {NONE} | {NONE} | {NONE} |" for p in POOLINGS
             if p in every_ratio]
    full = scores.get("full context")
    rows.append(f"| full context (not an LCLM) | the pretrained decoder | {NONE} | {NONE} "
                f"| {f'{full:.1f}%' if full is not None else 'not run on the suite'} |")
    return "\n".join([HEADER, *rows])


def readme_table(text: str) -> str:
    """The table between the README's markers."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: README.md has no status table markers ({BEGIN} ... {END})")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.status", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = parser.parse_args(argv)
    made = table()
    if not args.write:
        print(made)
        return 0
    text = README.read_text(encoding="utf-8")
    old = readme_table(text)
    README.write_text(text.replace(old, made, 1), encoding="utf-8")
    print("README.md: status table " + ("unchanged" if old == made else "rewritten"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
