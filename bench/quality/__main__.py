"""Quality evaluation: reconstruction fidelity per ratio and pooling, and a RULER-style
synthetic suite for LCLM at each ratio, LCLM 1:16 + EXPAND, full context on the same
decoder, and kvpress KV-cache baselines at the matched ratio 1 - 1/N.

    python -m bench.quality                                  (embedded default, CPU-sized)
    python -m bench.quality --lengths 4096 8192 16384 --samples 20 --checkpoint-root runs/

Results: bench/results/quality/quality.{json,md,png}. The haystacks and reconstruction
spans are validation text of the prepared corpus (never the common-licenses texts).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from model.config import DEFAULT_POOLING, DEFAULT_RATIO, RATIOS
from model.presses import PRESSES

# every registered press but two that the paper does not compare against (they run when named)
DEFAULT_PRESSES = [name for name in PRESSES if name not in ("knorm", "streaming_llm")]
UNTRAINED = ("UNTRAINED: these numbers come from the embedded default with freshly initialised adapters "
             "(no LCLM training), so they show that the harness runs end to end, not what a trained LCLM scores.")
TRAINED = "Trained checkpoints."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="data/corpus.safetensors.xz", help="prepared corpus (validation split)")
    parser.add_argument("--ratios", type=int, nargs="+", default=list(RATIOS))
    parser.add_argument("--poolings", nargs="+", default=["mean", "concat"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024], help="RULER context lengths (tokens)")
    parser.add_argument("--samples", type=int, default=1, help="examples per task and length")
    parser.add_argument("--tasks", nargs="+", help="task names (default: all)")
    parser.add_argument("--presses", nargs="*", choices=list(PRESSES), default=DEFAULT_PRESSES,
                        help="presses of model/presses.py (default: all but knorm and streaming_llm)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="RULER methods whose names contain one of these (e.g. 'full context' '1:4 concat' "
                             "EXPAND); default: all that --ratios, --poolings and --presses give")
    parser.add_argument("--spans", type=int, default=4, help="reconstruction spans per variant")
    parser.add_argument("--span-tokens", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=48, help="small models restate the question first")
    parser.add_argument("--prompt-profile", choices=["paper", "studio"], default="paper",
                        help="prompts of the full, LCLM and EXPAND answers (default: the authors' layout)")
    parser.add_argument("--chunk-tokens", type=int, default=256,
                        help="decoder tokens per EXPAND chunk (the paper's 256)")
    parser.add_argument("--expand-new-tokens", type=int, default=256, help="new tokens per EXPAND round")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default=None,
                        help="auto (default): bfloat16 where the device computes it fast (model.precision)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--haystack", help="a text file to draw haystacks and spans from instead of the corpus's "
                        "validation split")
    parser.add_argument("--skip", nargs="*", default=[], choices=["fidelity", "ruler"])
    parser.add_argument("--out", default="bench/results/quality")
    parser.add_argument("--from-json", help="only rewrite the markdown table and plot of an earlier quality.json")
    args = parser.parse_args(argv)
    if args.from_json:
        from bench.quality import report

        paths = report.write(Path(args.out), json.loads(Path(args.from_json).read_text()))
        print(json.dumps({k: str(v) for k, v in paths.items()}))
        return 0

    from app.engine.service import Studio
    from app.engine.settings import Settings
    from bench.quality import report
    from bench.quality.suite import methods, ruler_examples, run_fidelity, run_ruler
    from model.training.data.shards import load_corpus
    from model.training.data.synthetic import TASKS, Haystack

    corpus_path = Path(args.corpus)
    if not args.haystack and not corpus_path.exists():
        parser.error(f"{corpus_path} not found: run `python -m model.training.data prepare --pack {corpus_path}` first")
    if args.span_tokens > args.chunk_tokens:
        parser.error("--span-tokens must not exceed --chunk-tokens: each reconstruction span is one chunk")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    studio = Studio(Settings.from_env(device=args.device, dtype=args.dtype, chunk_tokens=args.chunk_tokens,
                                      stop_at_repeat=False))  # plain greedy, as RULER scores it
    model = studio.model(ratio=DEFAULT_RATIO, pooling=DEFAULT_POOLING)
    if args.haystack:
        validation = TextSource(Path(args.haystack).read_text(errors="replace"), model.decoder_tokenizer)
    else:
        corpus = load_corpus(corpus_path)
        corpus.check_tokenizer(model.decoder_tokenizer)
        validation = corpus["validation"]
    started = time.perf_counter()
    result = {"checkpoint": "embedded default", "trained": bool(model.config.trained),
              "note": TRAINED if model.config.trained else UNTRAINED,
              "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs, device {model.device}",
              **studio.dtype_choice().to_dict(), "torch_threads": __import__("torch").get_num_threads()}

    if "fidelity" not in args.skip:
        # evenly spaced validation documents, one span of `span_tokens` from the start of each
        step = max(1, validation.num_docs // args.spans)
        texts = [model.decoder_tokenizer.decode(validation.document(i * step)[: args.span_tokens])
                 for i in range(args.spans)]
        result["fidelity"] = run_fidelity(studio, texts, args.ratios, args.poolings)
        print(report.markdown(*report.fidelity_table(result["fidelity"])), flush=True)
        report.write(Path(args.out), result)  # partial results survive an interrupted RULER run

    if "ruler" not in args.skip:
        text = model.decoder_tokenizer.decode(validation.tokens[: 400_000].tolist())
        haystack = Haystack(text, lambda t: len(model.encoder_tokenizer(t, add_special_tokens=False)["input_ids"]))
        examples = ruler_examples(haystack, args.tasks or sorted(TASKS), args.lengths, args.samples)
        all_methods = [m for m in methods(args.ratios, args.poolings, args.presses)
                       if not args.only or any(part in m.name for part in args.only)]
        if not all_methods:
            parser.error(f"--only {args.only} names none of the methods")
        result["ruler"] = run_ruler(studio, all_methods, examples, args.max_new_tokens,
                                    prompt_profile=args.prompt_profile, expand_new_tokens=args.expand_new_tokens)
        print(report.markdown(*report.ruler_table(result["ruler"])), flush=True)

    result["seconds"] = round(time.perf_counter() - started, 1)
    paths = report.write(Path(args.out), result)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


class TextSource:
    """A text file standing in for the corpus's validation split: its documents are equal slices."""

    def __init__(self, text: str, tokenizer, docs: int = 16):
        import torch

        self.tokens = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])  # [T]
        self.num_docs = docs

    def document(self, index: int):
        size = len(self.tokens) // self.num_docs
        return self.tokens[index * size: (index + 1) * size].tolist()


if __name__ == "__main__":
    sys.exit(main())
