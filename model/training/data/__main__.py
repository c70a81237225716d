"""Corpus commands.

    python -m model.training.data prepare --out data/corpus [--tokenizer embedded] [--max-tokens 6000000]
    python -m model.training.data pack data/corpus data/corpus.safetensors.xz
    python -m model.training.data info data/corpus.safetensors.xz
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.training.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize the offline corpus into shards")
    p.add_argument("--out", default="data/corpus")
    p.add_argument("--tokenizer", default="embedded", help='"embedded" or a local tokenizer directory')
    p.add_argument("--max-tokens", type=int, default=6_000_000, help="token cap per source")
    p.add_argument("--validation-permille", type=int, default=20)
    p.add_argument("--sources", nargs="*", help="only these sources (names as in the manifest)")
    p.add_argument("--pack", help=f"also write the packed file here (…{'.safetensors.xz'})")
    k = sub.add_parser("pack", help="shards -> one xz-compressed file (< 40 MiB) to carry to a GPU host")
    k.add_argument("directory")
    k.add_argument("out")
    i = sub.add_parser("info", help="token counts of a shard directory or packed file")
    i.add_argument("path")
    args = parser.parse_args(argv)

    from model.training.data.shards import load_corpus, pack

    if args.command == "prepare":
        from model.training.data.corpus import default_sources
        from model.training.data.prepare import load_tokenizer, prepare

        sources = default_sources()
        if args.sources:
            unknown = set(args.sources) - {s.name for s in sources}
            if unknown:
                parser.error(f"unknown sources {sorted(unknown)}; known: {[s.name for s in sources]}")
            sources = [s for s in sources if s.name in args.sources]
        manifest = prepare(sources, load_tokenizer(args.tokenizer), args.out, tokenizer_name=args.tokenizer,
                           max_tokens_per_source=args.max_tokens, validation_permille=args.validation_permille)
        summary = {k: manifest[k] for k in ("tokenizer", "total_tokens", "seconds")}
        summary["splits"] = {s: v["tokens"] for s, v in manifest["splits"].items()}
        summary["sources"] = [{k: s[k] for k in ("name", "licence", "tokens")} for s in manifest["sources"]]
        print(json.dumps(summary, indent=2))
        if args.pack:
            print(json.dumps(pack(args.out, args.pack), indent=2))
    elif args.command == "pack":
        print(json.dumps(pack(args.directory, args.out), indent=2))
    else:
        corpus = load_corpus(args.path)
        print(json.dumps({"tokenizer": corpus.manifest["tokenizer"],
                          **{s: {"tokens": corpus[s].num_tokens, "documents": corpus[s].num_docs}
                             for s in corpus.splits}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
