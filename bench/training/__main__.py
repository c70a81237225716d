"""The training-recipe study: every campaign recipe trained for the same wall-clock box on the
same variant, one after another, then compared by validation accuracy per CPU-minute.

    python -m bench.training --variant cs4-concat --minutes 8 --threads 1 [--recipes a,b,...]

Runs live in runs/study/<recipe>/ (state/ and out/); a recipe whose run exists is resumed up to
the box, so an interrupted study continues. Results: bench/results/training/study.{json,md,png}
and each recipe's curve beside them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

RESULTS = Path("bench/results/training")


def run_recipe(recipe: str, variant: str, minutes: float, threads: int, root: Path) -> dict | None:
    state, out = root / recipe / "state", root / recipe / "out"
    metrics = out / "metrics.json"
    if metrics.is_file() and json.loads(metrics.read_text())["wall_s"] >= 60 * minutes * 0.9:
        return json.loads(metrics.read_text())
    command = [sys.executable, "-m", "model.training.campaign", "--variant", variant, "--recipe", recipe,
               "--minutes", str(minutes), "--state", str(state), "--out", str(out), "--threads", str(threads),
               "--eval-minutes", str(max(1.0, minutes / 4))]
    print("+", " ".join(command), flush=True)
    if subprocess.call(command) != 0 or not metrics.is_file():
        return None
    return json.loads(metrics.read_text())


def summary_row(metrics: dict) -> dict:
    evals = metrics["evals"]
    first, last = evals[0], evals[-1]
    minutes = last["cpu_s"] / 60
    return {"recipe": metrics["recipe"]["name"], "summary": metrics["recipe"]["summary"],
            "precision": metrics["precision"], "threads": metrics.get("threads"), "steps": metrics["step"],
            "tokens": sum(metrics["tokens"].values()), "cpu_minutes": round(minutes, 1),
            "wall_minutes": round(last["wall_s"] / 60, 1),
            "prior_teacher_forced": first["teacher_forced"], "teacher_forced": last["teacher_forced"],
            "gain_per_cpu_minute": round((last["teacher_forced"] - first["teacher_forced"]) / max(minutes, 1e-9), 5),
            "free_running_start": first["free_running"], "free_running": last["free_running"]}


def write_report(rows: list[dict], runs: dict[str, dict], variant: str, cpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "study.json").write_text(json.dumps({"variant": variant, "cpu": cpu, "rows": rows,
                                                    "curves": {k: v["evals"] for k, v in runs.items()}}, indent=1))
    lines = [f"Recipe study, {variant}, {cpu}; teacher-forced token accuracy on 32 held-back 64-token spans "
             "(step 0 = the decoder's prior), free-running reconstruction token accuracy on 4 of them.", "",
             "| recipe | dtype | steps | tokens | CPU min | teacher-forced (prior -> end) | gain per CPU-min | "
             "free-running (start -> end) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['precision']} | {r['steps']} | {r['tokens']:,} | {r['cpu_minutes']} | "
                     f"{r['prior_teacher_forced']:.3f} -> {r['teacher_forced']:.3f} | "
                     f"{r['gain_per_cpu_minute']:+.4f} | "
                     f"{r['free_running_start']:.3f} -> {r['free_running']:.3f} |")
    (RESULTS / "study.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, metrics in runs.items():
        evals = metrics["evals"]
        axes[0].plot([e["tokens"] for e in evals], [e["teacher_forced"] for e in evals], marker="o", label=name)
        axes[1].plot([e["cpu_s"] / 60 for e in evals], [e["teacher_forced"] for e in evals], marker="o", label=name)
    axes[0].set_xlabel("tokens trained")
    axes[1].set_xlabel("CPU minutes (process time)")
    axes[0].set_ylabel("teacher-forced token accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle(f"recipe study, {variant}, {cpu}", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "study.png", dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from model.training.campaign import RECIPES, VARIANTS, cpu_name

    parser = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="cs4-concat", choices=sorted(VARIANTS))
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock box per recipe")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names")
    parser.add_argument("--runs", type=Path, default=Path("runs/study"))
    args = parser.parse_args(argv)
    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    runs = {}
    for name in names:
        metrics = run_recipe(name, args.variant, args.minutes, args.threads, args.runs)
        if metrics is None:
            print(f"{name}: the run failed; left out", file=sys.stderr)
            continue
        runs[name] = metrics
        write_report([summary_row(m) for m in runs.values()], runs, args.variant, cpu_name())
        shutil.copyfile(args.runs / name / "out" / "curve.png", RESULTS / f"curve-{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
