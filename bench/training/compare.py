"""Campaign runs side by side: how much of their validation accuracy the latents carry.

    python -m bench.training.compare --name warm-start \
        lora-recon=runs/p-steps/out/metrics.json warm-lora-recon=runs/cs4-concat-warm/out/metrics.json

Each run's validation curve (metrics.json of `model.training.campaign`) against CPU minutes:
teacher-forced accuracy with each span's own latents, the same with another span's latents
(what the trained decoder guesses from the corpus alone), their gap (what the latents carry),
and free-running reconstruction where measured. Writes bench/results/training/NAME.{md,png,json}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path("bench/results/training")


def rows(label: str, metrics: dict) -> list[dict]:
    out = []
    for e in metrics["evals"]:
        other = e.get("teacher_forced_other")
        out.append({"run": label, "step": e["step"], "tokens": e["tokens"], "cpu_minutes": round(e["cpu_s"] / 60, 1),
                    "teacher_forced": e["teacher_forced"], "teacher_forced_other": other,
                    "latent_gap": None if other is None else round(e["teacher_forced"] - other, 4),
                    "free_running": e.get("free_running")})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.training.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="output name under bench/results/training/")
    parser.add_argument("runs", nargs="+", help="LABEL=path/to/metrics.json")
    args = parser.parse_args(argv)
    runs = {}
    for item in args.runs:
        label, _, path = item.partition("=")
        if not path:
            parser.error(f"{item!r}: expected LABEL=path/to/metrics.json")
        runs[label] = json.loads(Path(path).read_text())
    table = {label: rows(label, m) for label, m in runs.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    first = next(iter(runs.values()))
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"variant": first["variant"], "cpu": first.get("cpu"), "runs": {label: {
            "recipe": m["recipe"]["name"], "summary": m["recipe"]["summary"], "precision": m["precision"],
            "threads": m.get("threads"), "warm_start": m.get("warm_start"), "evals": table[label]}
            for label, m in runs.items()}}, indent=1))
    lines = [f"{first['variant']}, {first.get('cpu')}, {first['precision']}: validation on 32 held-back 64-token "
             "spans. *Own*: each span's own latents; *other*: another span's latents (the decoder's guess from "
             "the corpus alone); *gap*: what the latents carry.", "",
             "| run | step | tokens | CPU min | teacher-forced, own | other | gap | free-running |",
             "|---|---|---|---|---|---|---|---|"]
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for label, entries in table.items():
        for r in entries:
            lines.append(f"| {label} | {r['step']} | {r['tokens']:,} | {r['cpu_minutes']} | {fmt(r['teacher_forced'])} "
                         f"| {fmt(r['teacher_forced_other'])} | {fmt(r['latent_gap'])} | {fmt(r['free_running'])} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for label, entries in table.items():
        xs = [r["cpu_minutes"] for r in entries]
        line, = axes[0].plot(xs, [r["teacher_forced"] for r in entries], marker="o", label=f"{label}, own latents")
        other = [(r["cpu_minutes"], r["teacher_forced_other"]) for r in entries
                 if r["teacher_forced_other"] is not None]
        if other:
            axes[0].plot(*zip(*other), ls=":", marker=".", color=line.get_color(), label=f"{label}, other spans'")
            axes[1].plot([x for x, _ in other], [r["latent_gap"] for r in entries if r["latent_gap"] is not None],
                         marker="o", color=line.get_color(), label=label)
    axes[0].set_ylabel("teacher-forced token accuracy")
    axes[1].set_ylabel("own minus other spans' latents")
    for ax in axes:
        ax.set_xlabel("CPU minutes (process time)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"what the latents carry: {first['variant']}, {first.get('cpu')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}.png", dpi=90)
    plt.close(fig)
    print(f"wrote {RESULTS / args.name}.{{md,png,json}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
