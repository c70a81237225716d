"""Results of a sweep: one JSON document (every figure also as a ratio to full context at the
same length, measured in the same run), PNG plots and a Markdown table."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
from importlib import metadata
from pathlib import Path

import psutil
import torch

from bench.speed.analytic import cached_ttft_gain_limit, encoder_share, ttft_gain_limit
from bench.speed.methods import TIMED_METHODS
from bench.speed.rigs import Rig
from bench.speed.sweep import MEASURED_FIELDS, Plan, Point
from model.precision import cpu_name

MiB = 2**20


# ---- the machine ----------------------------------------------------------------------------
def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, memory, kind = props.name, props.total_memory, "gpu"
    else:
        name, memory, kind = f"{cpu_name()}, {os.cpu_count()} cores", psutil.virtual_memory().total, "cpu"
    return {
        "name": name, "kind": kind, "memory_bytes": memory, "cpu": cpu_name(), "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": version("transformers"), "kvpress": version("kvpress"), "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


PEAK_SHAPE = (2048, 576, 1536)  # (m, k, n): a prefill's MLP matmul in the embedded model


def matmul_peaks(device: torch.device) -> dict | None:
    """FLOP/s of a large matmul on this CPU in float32 and bfloat16 (model.precision's probe at a
    prefill's size), on the threads the benchmark runs with; None on a GPU."""
    if device.type != "cpu":
        return None
    from model.precision import matmul_rate

    return {"shape": list(PEAK_SHAPE), "threads": torch.get_num_threads(),
            **{f"{name}_gflops": round(2 * matmul_rate(dtype, repeats=5, shape=PEAK_SHAPE) / 1e9, 1)
               for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}}


def prefill_flops(rig: Rig, method: str, median: dict, extra: dict, tokens: int) -> tuple[float, float] | None:
    """(analytic FLOPs, measured ms) of a request's prefill work (bench/speed/analytic.py): the
    encoder and the decoder prefill for the LCLM, the decoder prefill for the rest; None for presses."""
    enc, dec = rig.encoder_shape, rig.decoder_shape
    positions = median["positions"]
    if method == "full" or method == "question_only":
        return dec.flops_per_token(positions) * positions, median["prefill_ms"]
    if method in ("lclm", "lclm_cached"):
        flops = dec.flops_per_token(positions) * positions
        if method == "lclm":
            flops += enc.flops_per_token(min(rig.window, tokens)) * tokens
        return flops, median["compress_ms"] + median["prefill_ms"]
    if method.endswith("_followup"):
        asked = extra.get("prefill_positions") or len(rig.after)
        before = positions - asked  # the new positions attend to these and to each other (causal)
        return dec.flops_per_token(2 * before + asked) * asked, median["prefill_ms"]
    return None


def slug(machine_info: dict) -> str:
    name = (machine_info["name"] if machine_info["kind"] == "gpu"
            else f"{machine_info['cpu']} {machine_info['cpu_cores']}c")
    return machine_info["kind"] + "-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ---- records ----------------------------------------------------------------------------------
def analytic_gain(rig: Rig, method: str, tokens: int, ratio: int) -> float | None:
    if method == "lclm":
        return ttft_gain_limit(rig.encoder_shape, rig.decoder_shape, tokens, ratio, rig.window)
    if method == "lclm_cached":
        return cached_ttft_gain_limit(rig.decoder_shape, tokens, ratio)
    return None


def record(rig: Rig, point: Point, full: Point | None, peak: dict | None = None) -> dict:
    out = {"method": point.method, "label": TIMED_METHODS[point.method].label, "ratio": point.ratio,
           "tokens": point.tokens, "status": point.status, "reason": point.reason, "runs": len(point.samples)}
    if point.predicted_bytes:
        out["predicted_peak_above_weights_bytes"] = point.predicted_bytes
    limit = analytic_gain(rig, point.method, point.tokens, point.ratio) if point.ratio else None
    if limit is not None:
        out["analytic_ttft_gain"] = round(limit, 3)
    if not point.samples:
        return out
    med = point.median()
    out["median"] = {k: round(v, 3) for k, v in med.items()}
    out["samples_ttft_ms"] = [s["ttft_ms"] for s in point.samples]
    out["samples"], out["first_run_s"] = point.samples, round(point.first_run_s, 3)  # what a resumed sweep takes over
    out.update(point.extra())
    if med["compress_ms"] > 0:
        out["compress_tokens_per_s"] = round(point.tokens / (med["compress_ms"] / 1000), 1)
    work = prefill_flops(rig, point.method, med, out, point.tokens)
    if work and work[1] > 0:
        achieved = work[0] / (work[1] / 1000) / 1e9  # GFLOP/s
        out["prefill_gflops"] = round(achieved, 1)
        if peak:
            out["share_of_bf16_peak"] = round(achieved / peak["bfloat16_gflops"], 3)
    if full is not None and full.samples:
        ref = full.median()
        out["vs_full"] = {f: (round(med[f] / ref[f], 4) if ref[f] else None) for f in MEASURED_FIELDS}
        out["ttft_gain"] = round(ref["ttft_ms"] / med["ttft_ms"], 3)
        if med["peak_mem_above_weights_bytes"]:
            out["peak_above_weights_gain"] = round(ref["peak_mem_above_weights_bytes"]
                                                   / med["peak_mem_above_weights_bytes"], 3)
        if "analytic_ttft_gain" in out:
            out["share_of_analytic"] = round(out["ttft_gain"] / out["analytic_ttft_gain"], 3)
    return out


def analytic_table(rig: Rig, plan: Plan) -> list[dict]:
    rows = []
    for tokens in plan.lengths:
        for ratio in plan.ratios:
            rows.append({
                "tokens": tokens, "ratio": ratio,
                "ttft_gain_limit": round(ttft_gain_limit(rig.encoder_shape, rig.decoder_shape, tokens, ratio,
                                                         rig.window), 3),
                "cached_ttft_gain_limit": round(cached_ttft_gain_limit(rig.decoder_shape, tokens, ratio), 3),
                "encoder_share_of_lclm_flops": round(encoder_share(rig.encoder_shape, rig.decoder_shape, tokens, ratio,
                                                                   rig.window), 3),
            })
    return rows


def results(rig: Rig, plan: Plan, points: dict, machine_info: dict, wall_s: float, command: str) -> dict:
    fulls = {p.tokens: p for p in points.values() if p.method == "full"}
    return {
        "benchmark": "bench.speed",
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_info,
                    "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "rig": rig.describe(),
        "plan": dataclasses.asdict(plan),
        "wall_s": round(wall_s, 1),
        "definitions": {
            "ttft_ms": "request to first generated token = compress_ms + prefill_ms + first_token_ms + other_ms "
                       "(app/engine/measure.py)",
            "compress_ms": "LCLM: encoder + adapter (0 with cached latents); presses: context prefill with the press "
                           "(builds and compresses the KV cache)",
            "prefill_ms": "prompt building + decoder forward (presses: the question over the compressed cache)",
            "peak_mem_above_weights_bytes": "CUDA: max_memory_allocated above the memory held at the start; "
                                            "CPU: sampled RSS above RSS at the start",
            "kv_cache_bytes": "2 x layers x kv_heads x head_dim x positions x bytes per element",
            "positions": "decoder positions prefilled (presses: positions kept after compression + question)",
            "vs_full": "each median divided by full context's median at the same length, same run",
            "ttft_gain": "full-context TTFT / this TTFT",
            "analytic_ttft_gain": "prefill-FLOP limit of ttft_gain (bench/speed/analytic.py)",
            "prefill_gflops": "analytic FLOPs of the request's encoder + decoder prefill / its compress + prefill time",
            "share_of_bf16_peak": "prefill_gflops / machine.matmul_peak.bfloat16_gflops "
                                  "(a large bf16 matmul, same run)",
            "prefix_reused_positions": "follow-ups: positions whose KV the prefix cache held (not prefilled)",
        },
        "analytic": analytic_table(rig, plan),
        "records": [record(rig, p, fulls.get(p.tokens), machine_info.get("matmul_peak")) for p in points.values()],
    }


def write_json(data: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return path


# ---- plots --------------------------------------------------------------------------------------
STYLE = {"full": ("black", "-", "o"), "lclm": ("tab:blue", "-", "s"), "lclm_cached": ("tab:cyan", "--", "^"),
         "full_followup": ("dimgray", "-.", "o"), "lclm_followup": ("tab:purple", "-.", "s"),
         "question_only": ("tab:brown", ":", "x"), "snapkv": ("tab:orange", ":", "D"), "kvzip": ("tab:green", ":", "v")}


def ok_records(data: dict, method: str, ratio: int | None) -> list[dict]:
    rows = [r for r in data["records"] if r["method"] == method and r["ratio"] == ratio and r["status"] == "ok"]
    return sorted(rows, key=lambda r: r["tokens"])


def series(data: dict) -> list[tuple[str, int | None, str]]:
    """(method, ratio, legend label) of each line: full, the LCLM at every ratio, the rest at the main ratio."""
    main = max(data["plan"]["ratios"])
    out = [("full", None, "full context")]
    out += [("lclm", r, f"LCLM 1:{r} cold") for r in sorted(data["plan"]["ratios"], reverse=True)]
    out += [(m, main, f"{TIMED_METHODS[m].label} 1:{main}")
            for m in ("lclm_cached", "snapkv", "kvzip", "lclm_followup")]
    out += [(m, None, TIMED_METHODS[m].label) for m in ("full_followup", "question_only")]
    return [s for s in out if s[0] in data["plan"]["methods"]]


LCLM_RATIO_STYLE = {16: ("s", 1.0), 8: ("D", 0.7), 4: ("v", 0.45)}  # marker and alpha of each ratio's line


def full_context_predicted(data: dict) -> list[tuple[int, float]]:
    """(tokens, bytes) of full context's peak above the weights at the lengths past the decoder's
    positions, predicted from its bytes per position at the longest length it read."""
    full = ok_records(data, "full", None)
    if not full:
        return []
    last = full[-1]["median"]
    per_position = last["peak_mem_above_weights_bytes"] / last["positions"]
    prompt = last["positions"] - full[-1]["tokens"]
    past = sorted(r["tokens"] for r in data["records"]
                  if r["method"] == "full" and r["status"] == "exceeds_max_positions")
    return [(tokens, per_position * (tokens + prompt)) for tokens in past]


def line_plot(data: dict, value, ylabel: str, title: str, path: Path,
              predicted: list[tuple[int, float]] = ()) -> Path:
    """One line per series against the document's length (log-log); `predicted`: full context's
    values past the decoder's positions, drawn dashed from its last measured point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    for i, (method, ratio, label) in enumerate(series(data)):
        rows = ok_records(data, method, ratio)
        if not rows:
            continue
        color, style, marker = STYLE[method]
        alpha = 1.0
        if method == "lclm" and ratio != max(data["plan"]["ratios"]):
            marker, alpha = LCLM_RATIO_STYLE.get(ratio, (marker, 0.55))
        ax.plot([r["tokens"] for r in rows], [value(r) for r in rows], linestyle=style, marker=marker, color=color,
                alpha=alpha, label=label)
        if method == "full" and predicted:
            ax.plot([rows[-1]["tokens"]] + [t for t, _ in predicted], [value(rows[-1])] + [v for _, v in predicted],
                    linestyle=":", marker="o", markerfacecolor="none", color=color,
                    label=f"full context past {data['rig']['max_positions']:,} positions\n(predicted: its bytes per "
                          f"position at {rows[-1]['tokens']:,} tokens)")
    misses = [r for r in data["records"] if r["method"] == "full" and r["status"] in ("does_not_fit", "oom")]
    for r in misses:
        ax.axvline(r["tokens"], color="red", alpha=0.25, linewidth=6)
    if misses:
        ax.plot([], [], color="red", alpha=0.25, linewidth=6, label="full context does not fit")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("document tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the plot: no line hidden
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compress_plot(data: dict, title: str, path: Path) -> Path:
    """Compression time against the ratio: the LCLM at every length, presses where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ratios = data["plan"]["ratios"]
    for method in ("lclm", "snapkv", "kvzip"):
        for tokens in data["plan"]["lengths"]:
            rows = [r for r in data["records"] if r["method"] == method and r["tokens"] == tokens
                    and r["status"] == "ok" and r["median"]["compress_ms"] > 0]
            if len(rows) < 2:
                continue
            rows.sort(key=lambda r: r["ratio"])
            color, style, marker = STYLE[method]
            ax.plot([r["ratio"] for r in rows], [r["median"]["compress_ms"] for r in rows], color=color,
                    linestyle=style, marker=marker, label=f"{TIMED_METHODS[method].label}, {tokens:,} tokens")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ratios, [f"1:{r}" for r in ratios])
    ax.set_yscale("log")
    ax.set_xlabel("compression ratio")
    ax.set_ylabel("compression time (ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plots(data: dict, stem: Path) -> list[Path]:
    where = f"{data['machine']['name']}; {data['rig']['name']}, {data['rig']['dtype']}"
    return [
        line_plot(data, lambda r: r["median"]["ttft_ms"], "TTFT (ms)", f"Time to first token\n{where}",
                  stem.with_name(stem.name + "-ttft.png")),
        line_plot(data, lambda r: max(r["median"]["peak_mem_above_weights_bytes"], 1) / MiB,
                  "peak memory above the weights (MiB)", f"Peak memory above the weights\n{where}",
                  stem.with_name(stem.name + "-memory.png"),
                  predicted=[(t, b / MiB) for t, b in full_context_predicted(data)]),
        compress_plot(data, f"Compression time vs ratio\n{where}", stem.with_name(stem.name + "-compress.png")),
    ]


# ---- Markdown table ---------------------------------------------------------------------------
def fmt(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def markdown_table(data: dict) -> str:
    head = ("| tokens | method | 1:N | TTFT ms | TTFT gain | analytic limit | compress ms | prefill ms | decode tok/s "
            "| peak above weights MiB (× full) | KV cache MiB | positions |")
    lines = [head, "|" + "|".join(["---"] * 12) + "|"]
    order = {name: i for i, name in enumerate(TIMED_METHODS)}
    rows = sorted(data["records"], key=lambda r: (r["tokens"], order[r["method"]], r["ratio"] or 0))
    for r in rows:
        if r["status"] in ("not_planned",):
            continue
        ratio = f"1:{r['ratio']}" if r["ratio"] else "–"
        limit = fmt(r.get("analytic_ttft_gain"), 2) + ("×" if r.get("analytic_ttft_gain") else "")
        if r["status"] != "ok":
            lines.append(f"| {r['tokens']:,} | {r['method']} | {ratio} | "
                         f"{r['status'].replace('_', ' ')}: {r['reason']} "
                         f"| – | {limit} | – | – | – | – | – | – |")
            continue
        med, vs = r["median"], r.get("vs_full", {})
        peak = med["peak_mem_above_weights_bytes"] / MiB
        lines.append(
            f"| {r['tokens']:,} | {r['method']} | {ratio} | {fmt(med['ttft_ms'])} | "
            f"{times(r.get('ttft_gain'))} | {limit} "
            f"| {fmt(med['compress_ms'])} | {fmt(med['prefill_ms'])} | {fmt(med['tokens_per_s'], 1)} "
            f"| {fmt(peak)} ({times(vs.get('peak_mem_above_weights_bytes'))}) | {fmt(med['kv_cache_bytes'] / MiB, 1)} "
            f"| {fmt(med['positions'])} |")
    return "\n".join(lines) + "\n"


# ---- dtypes measured in one run --------------------------------------------------------------
def dtype_comparison(all_data: dict[str, dict]) -> dict:
    """Each point measured in every dtype of the run: its median TTFT and prefill per dtype, and
    the ratio of the first dtype's to each other's (e.g. float32 TTFT / bfloat16 TTFT)."""
    names = list(all_data)
    first = names[0]
    index = {name: {(r["method"], r["ratio"], r["tokens"]): r for r in data["records"] if r["status"] == "ok"}
             for name, data in all_data.items()}
    rows = []
    for key, ref in index[first].items():
        row = {"method": key[0], "ratio": key[1], "tokens": key[2]}
        for name in names:
            r = index[name].get(key)
            row[f"{name}_ttft_ms"] = r["median"]["ttft_ms"] if r else None
            row[f"{name}_share_of_bf16_peak"] = r.get("share_of_bf16_peak") if r else None
            if r and name != first:
                row[f"ttft_{first}_over_{name}"] = round(ref["median"]["ttft_ms"] / r["median"]["ttft_ms"], 3)
            if r and r.get("ttft_gain"):
                row[f"{name}_ttft_gain"] = r["ttft_gain"]
                row[f"{name}_share_of_analytic"] = r.get("share_of_analytic")
        rows.append(row)
    data = all_data[first]
    return {"benchmark": "bench.speed dtypes", "command": data["command"], "date": data["date"], "dtypes": names,
            "machine": data["machine"], "rows": rows,
            "definitions": {"ttft_<a>_over_<b>": "median TTFT in dtype a / in dtype b, same point, runs interleaved "
                            "in one process"}}


def dtype_table(comparison: dict) -> str:
    names = comparison["dtypes"]
    first = names[0]
    head = ["tokens", "method", "1:N"] + [f"TTFT ms {n}" for n in names] + [f"{first} / {n}" for n in names[1:]] + [
        f"TTFT gain vs full, {n}" for n in names] + [f"share of bf16 peak, {n}" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    order = {name: i for i, name in enumerate(TIMED_METHODS)}
    for r in sorted(comparison["rows"], key=lambda r: (r["tokens"], order[r["method"]], r["ratio"] or 0)):
        cells = [f"{r['tokens']:,}", r["method"], f"1:{r['ratio']}" if r["ratio"] else "–"]
        cells += [fmt(r.get(f"{n}_ttft_ms")) for n in names]
        cells += [times(r.get(f"ttft_{first}_over_{n}")) for n in names[1:]]
        cells += [times(r.get(f"{n}_ttft_gain")) for n in names]
        cells += [fmt(r.get(f"{n}_share_of_bf16_peak"), 3) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
