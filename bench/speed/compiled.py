"""The prefill's kernels, compared in one run: the decoder's prefill of a document (full context)
and the encoder's compression of it, eager with SDPA attention (what the studio runs), eager
with the plain attention implementation, and under `torch.compile` (inductor, which builds C++
kernels with this machine's gcc, fusing RMSNorm, rotary embeddings and SiLU into the matmuls'
neighbours). For each: median ms of `--runs` after a warm-up (the compile time is reported
apart), and the share of the CPU's bf16 matmul peak that the analytic FLOPs reach in that time.

    python -m bench.speed.compiled [--tokens 1024 4096 7680] [--runs 3] [--dtype bfloat16]

Results: bench/results/speed-compiled.{json,md}."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from bench import save_results
from bench.speed.report import matmul_peaks
from bench.speed.rigs import checkpoint_rig
from model.generation import prefill
from model.precision import DTYPES, cpu_name

PLAIN_ATTENTION_MAX_TOKENS = 1024


def timed(work: Callable[[], object], runs: int) -> tuple[float, float]:
    """(first call's ms, median ms of `runs` later calls)."""
    started = time.perf_counter()
    work()
    first = (time.perf_counter() - started) * 1000
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        samples.append((time.perf_counter() - started) * 1000)
    return first, statistics.median(samples)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.speed.compiled", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 7680])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--out", default="bench/results/speed-compiled")
    args = parser.parse_args(argv)
    rig = checkpoint_rig(None, [16], device="cpu", dtype=DTYPES[args.dtype])
    lclm = rig.lclms[16]
    peak = matmul_peaks(rig.device)[f"{args.dtype}_gflops"]
    rows = []

    def attention(implementation: str):
        def run(embeds):
            kept = rig.decoder.config._attn_implementation
            rig.decoder.config._attn_implementation = implementation
            try:
                return prefill(rig.decoder, embeds)
            finally:
                rig.decoder.config._attn_implementation = kept
        return run

    compiled_decoder = torch.compile(rig.decoder, dynamic=False)
    prefills = {"eager, SDPA attention": lambda e: prefill(rig.decoder, e),
                "eager, plain attention": attention("eager"),
                "torch.compile (inductor)": lambda e: prefill(compiled_decoder, e)}
    for tokens in args.tokens:
        ids = torch.tensor([rig.before + rig.document(tokens, seed=0) + rig.after])  # [1, P]
        embeds = rig.decoder.get_input_embeddings()(ids)  # [1, P, D]
        flops = rig.decoder_shape.flops_per_token(ids.shape[1]) * ids.shape[1]
        for name, run in prefills.items():
            if name == "eager, plain attention" and tokens > PLAIN_ATTENTION_MAX_TOKENS:
                continue  # 25 s a call at 4k tokens on a 2-core CPU: measured at the shortest length only
            first, ms = timed(lambda: run(embeds), args.runs)
            rows.append({"part": "decoder prefill", "tokens": tokens, "positions": ids.shape[1], "variant": name,
                         "first_call_ms": round(first, 1), "median_ms": round(ms, 1),
                         "gflops": round(flops / ms / 1e6, 1), "share_of_peak": round(flops / ms / 1e6 / peak, 3)})
            print(json.dumps(rows[-1]), flush=True)
    encoder = lclm.encoder.model
    compiled_encoder = torch.compile(encoder, dynamic=False)
    for tokens in args.tokens:
        document = rig.document(tokens, seed=1)
        flops = rig.encoder_shape.flops_per_token(min(rig.window, tokens)) * tokens
        for name, model in (("eager, SDPA attention", encoder), ("torch.compile (inductor)", compiled_encoder)):
            lclm.encoder.model = model
            try:
                first, ms = timed(lambda: lclm.compress(document), args.runs)
            finally:
                lclm.encoder.model = encoder
            rows.append({"part": "encoder (compress)", "tokens": tokens, "positions": tokens, "variant": name,
                         "first_call_ms": round(first, 1), "median_ms": round(ms, 1),
                         "gflops": round(flops / ms / 1e6, 1), "share_of_peak": round(flops / ms / 1e6 / peak, 3)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "dtype": args.dtype, "runs": args.runs,
              f"{args.dtype}_matmul_peak_gflops": peak, "torch": torch.__version__, "rows": rows}
    save_results(args.out, result, markdown(result))
    return result


def markdown(result: dict) -> str:
    peak_key = f"{result['dtype']}_matmul_peak_gflops"
    lines = [f"# Prefill kernels: eager, plain attention, torch.compile\n\n{result['cpu']}, {result['threads']} "
             f"threads, {result['dtype']} (matmul peak measured in the same run: {result[peak_key]:,.0f} GFLOP/s), "
             f"torch {result['torch']}; median of {result['runs']} after a warm-up call (its time: first call).\n",
             "| part | tokens | variant | first call ms | median ms | GFLOP/s | share of the matmul peak |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['part']} | {r['tokens']:,} | {r['variant']} | {r['first_call_ms']:,.0f} "
                     f"| {r['median_ms']:,.0f} | {r['gflops']:,.1f} | {r['share_of_peak']:.0%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
