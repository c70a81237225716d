"""Where a prefill's time goes: one full-context prefill of the embedded model (or a checkpoint)
under torch.profiler, the top operators by their own CPU time.

    python -m bench.speed.op_profile --tokens 4096 --dtype bfloat16 --threads 1
"""

from __future__ import annotations

import argparse

import torch

from bench.speed.rigs import checkpoint_rig
from model.generation import prefill
from model.precision import DTYPES


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench.speed.op_profile", description=__doc__)
    parser.add_argument("--checkpoint", help="default: the embedded model")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rig = checkpoint_rig(args.checkpoint, [16], device="cpu", dtype=DTYPES[args.dtype])
    ids = torch.tensor([rig.before + rig.document(args.tokens, seed=0) + rig.after])  # [1, P]
    embeds = rig.decoder.get_input_embeddings()(ids)  # [1, P, D]
    prefill(rig.decoder, embeds[:, :64])  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        prefill(rig.decoder, embeds)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    print(f"{args.tokens} tokens, {args.dtype}, {torch.get_num_threads()} threads\n{table}", flush=True)
    return table


if __name__ == "__main__":
    main()
