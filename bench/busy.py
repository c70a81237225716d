"""One CLI process per question on a quiet CPU and on one with cores kept busy by other processes
(plain Python busy loops): the time to first token and the decoding rate of full context and of
the LCLM, the threads and dtype each process chose, and `auto`'s dtype over many starts under a
heavier load. Each process runs `lclm ask ... --json` as a user would; the runs of the two
machines' states are interleaved (run 1 quiet, run 1 busy, run 2 quiet, ...).

    python -m bench.busy [--runs 3] [--doc-tokens 4000] [--busy 1] [--dtype-starts 10] [--dtype-busy 3]

Results: bench/results/busy.{json,md}."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from bench import save_results
from bench.load import long_document
from bench.long_document import cli
from model.precision import cpu_name

QUESTION = "What is the code of this report?"
METHODS = {  # name -> the ask command's arguments
    "full context": ["--mode", "full"],
    "LCLM 1:16 mean": ["--mode", "lclm", "--ratio", "16", "--pooling", "mean"],
}
BUSY_LOOP = "while True: pass"
DTYPE_PROBE = "from model.precision import choose_dtype; print(choose_dtype('auto', 'cpu').name)"


@contextmanager
def busy_cores(count: int):
    """`count` other processes, each keeping one core busy, for the duration of the block."""
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]
    try:
        time.sleep(1.0 if loops else 0)  # let the scheduler see them before the process under test starts
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def ask_once(path: Path, method_args: list[str], new_tokens: int) -> dict:
    """One `lclm ask` process: its JSON answer, with the process's wall time."""
    args = ["ask", str(path), "-q", QUESTION, *method_args, "--dtype", "auto", "--max-new-tokens", str(new_tokens),
            "--json", "--no-cache"]
    started = time.perf_counter()
    status, answer, stderr = cli(args)
    if status != 0:
        raise SystemExit(f"lclm {' '.join(args)} failed:\n{stderr[-2000:]}")
    answer["process_s"] = time.perf_counter() - started
    return answer


def dtype_starts(count: int) -> list[str]:
    """The dtype `auto` chose in each of `count` fresh processes."""
    return [subprocess.run([sys.executable, "-c", DTYPE_PROBE], capture_output=True, text=True,
                           check=True).stdout.strip() for _ in range(count)]


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.busy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--doc-tokens", type=int, default=4000)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--busy", type=int, default=1, help="cores kept busy in the busy state")
    parser.add_argument("--dtype-starts", type=int, default=10)
    parser.add_argument("--dtype-busy", type=int, default=3, help="cores kept busy while dtype is chosen")
    parser.add_argument("--out", default="bench/results/busy")
    args = parser.parse_args(argv)
    states = {"quiet": 0, "busy": args.busy}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.txt"
        path.write_text(long_document(7, args.doc_tokens))
        for run in range(args.runs):
            for state, count in states.items():
                with busy_cores(count):
                    for method, method_args in METHODS.items():
                        answer = ask_once(path, method_args, args.new_tokens)
                        row = {"run": run, "state": state, "method": method, **{k: answer.get(k) for k in (
                            "ttft_ms", "prefill_ms", "compress_ms", "tokens_per_s", "positions", "dtype", "threads",
                            "load_ms")}, "process_s": round(answer["process_s"], 2)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    with busy_cores(args.dtype_busy):
        dtypes = dtype_starts(args.dtype_starts)
    summary = []
    for method in METHODS:
        quiet = [r for r in rows if r["method"] == method and r["state"] == "quiet"]
        busy = [r for r in rows if r["method"] == method and r["state"] == "busy"]
        summary.append({"method": method, "quiet_ttft_ms": median(quiet, "ttft_ms"),
                        "busy_ttft_ms": median(busy, "ttft_ms"),
                        "busy_over_quiet": round(median(busy, "ttft_ms") / median(quiet, "ttft_ms"), 2),
                        "quiet_tokens_per_s": median(quiet, "tokens_per_s"),
                        "busy_tokens_per_s": median(busy, "tokens_per_s"),
                        "threads": {s: sorted({r["threads"] for r in rows if r["method"] == method and r["state"] == s})
                                    for s in states},
                        "dtypes": sorted({r["dtype"] for r in quiet + busy})})
    full, lclm = summary
    result = {"cpu": cpu_name(), "cores": os.cpu_count(), "doc_tokens": args.doc_tokens, "runs": args.runs,
              "busy_cores": args.busy, "command": "python -m bench.busy " + " ".join(sys.argv[1:] if argv is None
                                                                                     else argv),
              "summary": summary,
              "lclm_sooner": {s: round(full[f"{s}_ttft_ms"] / lclm[f"{s}_ttft_ms"], 2) for s in states},
              "dtype_starts": {"busy_cores": args.dtype_busy, "chosen": dtypes}, "rows": rows}
    save_results(args.out, result, markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = [f"# One process per question, quiet and busy\n\n{result['cpu']}, {result['cores']} cores; `auto` dtype; "
             f"a {result['doc_tokens']:,}-token report; {result['runs']} runs per state, interleaved; medians. "
             f"Busy: {result['busy_cores']} other process(es) each keeping a core busy.\n\n`{result['command']}`\n",
             "| method | dtype | threads quiet / busy | TTFT quiet ms | TTFT busy ms | busy / quiet "
             "| decode tok/s quiet | decode tok/s busy |", "|---|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        threads = " / ".join(",".join(str(t) for t in s["threads"][k]) for k in ("quiet", "busy"))
        lines.append(f"| {s['method']} | {', '.join(s['dtypes'])} | {threads} | {s['quiet_ttft_ms']:,.0f} "
                     f"| {s['busy_ttft_ms']:,.0f} | {s['busy_over_quiet']:.2f}x | {s['quiet_tokens_per_s']:.1f} "
                     f"| {s['busy_tokens_per_s']:.1f} |")
    sooner = result["lclm_sooner"]
    chosen = result["dtype_starts"]["chosen"]
    lines += ["", f"LCLM 1:16's first token sooner than full context's: {sooner['quiet']:.2f}x quiet, "
              f"{sooner['busy']:.2f}x busy.", "",
              f"`auto` over {len(chosen)} fresh processes with {result['dtype_starts']['busy_cores']} cores' worth "
              f"of busy loops: " + ", ".join(f"{name} {chosen.count(name)}" for name in sorted(set(chosen))) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
