"""The command line, `python -m model.training.campaign` (what a call does and leaves: the
package's docstring, which is its --help).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import model.training.campaign as package
from model.training.campaign.loop import PROBE_S, campaign, validate_checkpoint
from model.training.campaign.recipes import RECIPES, VARIANTS, run_config
from model.training.campaign.state import publish
from model.training.campaign.transfer import PART_BYTES, RETURN_BYTES, RETURN_FILES, pack, return_problems, unpack


def folders(args, variant: str) -> tuple[Path, Path]:
    """STATE/ and OUT/ of one variant: the given folders, or a sub-folder each under --variants."""
    if args.variants is None:
        return args.state, args.out
    return args.state / variant, args.out / variant


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.training.campaign", description=package.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="cs4-concat", choices=sorted(VARIANTS))
    parser.add_argument("--smoke", action="store_true",
                        help="the smoke run's tiny random pair and corpus (made under STATE/../smoke-data)")
    parser.add_argument("--recipe", default=next(iter(RECIPES)), choices=list(RECIPES))
    parser.add_argument("--variants", help="comma-separated variants trained in this order within --minutes (each "
                        "gets an equal share of what is left), under STATE/<variant> and OUT/<variant>; with --smoke "
                        "any names, each a copy of the smoke run")
    parser.add_argument("--minutes", type=float, help="wall-clock box of this call (all variants together)")
    parser.add_argument("--probe-s", type=float,
                        help=f"seconds of the throughput probe that picks the batch (default {PROBE_S:g} on CUDA, "
                             "none on a CPU: the recipe's batch)")
    parser.add_argument("--pack", type=Path, help="after each variant, write its OUT/ and state.json here as "
                        "<variant>.tar.N parts of at most 15 MiB (what a GPU machine can bring back)")
    parser.add_argument("--returned", type=Path,
                        help="first unpack <variant>.tar.N parts from here into STATE/ and OUT/ (a later call "
                             "continues from what an earlier one brought back)")
    parser.add_argument("--publish-only", action="store_true", help="train nothing: unpack --returned and --publish")
    parser.add_argument("--validate-only", action="store_true",
                        help="train nothing: print the validation of --init-from (or of the untrained variant) as JSON")
    parser.add_argument("--state", type=Path, help="resumable state directory (required unless --validate-only)")
    parser.add_argument("--out", type=Path, help="final/, metrics.json and curve.png (required unless --validate-only)")
    parser.add_argument("--corpus", help="shard directory or packed corpus (default: the variant's config)")
    parser.add_argument("--init-from", type=Path, help="start a new state from this published-layout checkpoint")
    parser.add_argument("--eval-minutes", type=float, default=5.0, help="validation every so many minutes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr-scale", type=float, default=1.0,
                        help="multiply the recipe's learning rates in this call (below 1 to anneal a long campaign)")
    parser.add_argument("--threads", type=int, help="torch threads (default: every core; 1 beside other work)")
    parser.add_argument("--publish", action="store_true",
                        help="copy final/ to the variant's model/weights/ folder when it beats its untrained start "
                             "and the variant shipped there")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.validate_only and (args.state is None or args.out is None):
        parser.error("--state and --out are required")
    if args.smoke and args.state is None:
        parser.error("--smoke needs --state (its tiny pair and corpus are made beside it)")
    if args.publish_only:
        args.publish = True
    elif not args.validate_only and (args.minutes is None or args.minutes <= 0):
        parser.error("--minutes must be given and positive")
    if args.lr_scale <= 0:
        parser.error("--lr-scale must be positive")
    variants = [args.variant] if args.variants is None else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS and not args.smoke]
    if unknown or not variants:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    smoke = None
    if args.smoke:
        from model.training.smoke import smoke_run

        smoke = smoke_run(args.state.resolve().parent)
    if args.variants is None and args.smoke:
        variants = ["smoke"]
    if args.validate_only:
        run = smoke or run_config(args.variant, RECIPES[args.recipe], args.corpus)
        print(json.dumps(validate_checkpoint(run, args.init_from, RECIPES[args.recipe])))
        return 0
    recipe = RECIPES[args.recipe]
    deadline = time.perf_counter() + 60 * (args.minutes or 0)
    for index, variant in enumerate(variants):
        state_dir, out = folders(args, variant)
        if args.returned and unpack(variant, args.returned, state_dir, out):
            print(f"{variant}: continuing from {args.returned}")
        if args.publish_only:
            state = json.loads((state_dir / "state.json").read_text())
        else:
            box = (deadline - time.perf_counter()) / (len(variants) - index)
            packed = [p for p in args.pack.rglob("*") if p.is_file()] if args.pack and args.pack.is_dir() else []
            largest = max((sum(p.stat().st_size for p in packed if p.name.startswith(v + ".tar."))
                           for v in variants[:index]), default=0)  # the next pack: as large as the largest so far
            if len(packed) + math.ceil(largest / PART_BYTES) > RETURN_FILES or \
                    sum(p.stat().st_size for p in packed) + largest > RETURN_BYTES:
                print(f"not trained: {', '.join(variants[index:])} (their packs would pass the return limits)")
                break
            if box < 5:
                print(f"not trained: {', '.join(variants[index:])} (no time left in the box)")
                break
            state = campaign(variant, recipe, box / 60, state_dir, out, args.corpus, args.init_from,
                             args.eval_minutes, args.seed, args.quiet, run=smoke, lr_scale=args.lr_scale,
                             probe_s=args.probe_s)
            if args.pack:
                parts = pack(variant, state_dir, out, args.pack)
                print(f"{variant}: packed {sum(p.stat().st_size for p in parts) / 2**20:.1f} MiB in {len(parts)} "
                      f"part(s) under {args.pack}")
        if args.publish:
            run = smoke or run_config(variant, recipe, args.corpus)
            if run.publish_to is None:
                parser.error("this run has no publish_to folder")
            target = Path(run.publish_to)
            target = target if target.is_absolute() else Path(__file__).resolve().parents[3] / target
            shipped = publish(out, state, run, target)
            print(f"published to {target}" if shipped else f"not published: final/ does not improve on {target} "
                  "or on its untrained start")
    if args.pack and (problems := return_problems(args.pack)):
        print(f"error: {args.pack} would not all come back: {'; '.join(problems)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
