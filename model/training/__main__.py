"""Train an LCLM with the authors' four-stage recipe.

    python -m model.training --config smollm2-l6-smollm2-135m-cs16-mean-w1024-causal-mlp --out runs/cs16-mean
    accelerate launch -m model.training --config CONFIG --out DIR      (one or many GPUs; FSDP via accelerate config)
    python -m model.training --smoke --out DIR                         (tiny model, all stages, CPU, about a minute)

Runs resume by themselves: run the same command again after an interruption. --config
takes a YAML path or a name from model/training/configs/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config: a YAML file or a name in model/training/configs/")
    parser.add_argument("--out", required=True, help="run directory (checkpoints, logs, final/)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model and corpus, all four stages on CPU")
    parser.add_argument("--stages", type=int, nargs="*", help="only these stages (default: all, in order)")
    parser.add_argument("--init", help="checkpoint to start the first selected stage from")
    parser.add_argument("--corpus", help="override the config's corpus (shard directory or packed file)")
    parser.add_argument("--steps", type=int, help="override every stage's step count (quick trials)")
    parser.add_argument("--publish", action="store_true", help="copy final/ to the config's publish_to")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if bool(args.smoke) == bool(args.config):
        parser.error("give exactly one of --config and --smoke")

    from dataclasses import replace

    from model.training.config import RunConfig
    from model.training.trainer import Trainer

    out = Path(args.out)
    started = time.perf_counter()
    if args.smoke:
        from model.training.smoke import prepare_smoke

        run = prepare_smoke(out)
    else:
        run = RunConfig.load(args.config)
    if args.corpus:
        run = replace(run, corpus=args.corpus)
    if args.steps:
        run = replace(run, stages=[replace(s, steps=args.steps, warmup_steps=min(s.warmup_steps, args.steps))
                                   for s in run.stages])
    trainer = Trainer(run, out, quiet=args.quiet)
    trainer.say(f"run {run.name} -> {out}")
    status = trainer.train(stages=args.stages, init_from=args.init)
    if status != "done":
        return 130
    seconds = time.perf_counter() - started
    if args.smoke and trainer.accelerator.is_main_process:
        from model.loading import load_lclm

        model = load_lclm(str(out / "final"), device="cpu")
        ids = model.tokenize_document("def load(path):\n    return json.loads(path.read_text())\n").ids
        latents = model.compress(ids)
        summary = {"run": run.name, "seconds": round(seconds, 1), "final": str(out / "final"),
                   "latents": list(latents.shape)}
        print(json.dumps(summary, indent=2))
        (out / "smoke.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.publish and trainer.accelerator.is_main_process:
        if not run.publish_to:
            parser.error("this config has no publish_to")
        shutil.rmtree(run.publish_to, ignore_errors=True)
        shutil.copytree(out / "final", run.publish_to)
        trainer.say(f"published to {run.publish_to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
