"""Command-line interface: `lclm compress|ask|reconstruct PATH ...` (also `python -m app.cli ...`).

Every error a user can cause prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from app.engine.answer import Answer
from app.engine.measure import Measurement, MiB
from app.engine.methods import METHODS, PRESS_METHODS
from app.engine.settings import DECODERS, POOLINGS, PROFILES, RATIOS
from model.precision import DTYPE_CHOICES

EXIT_USER_ERROR = 2


ANSWER_MODES = [name for name in METHODS if name not in PRESS_METHODS]  # the presses go by --press


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lclm", description="Compress documents into latent tokens, "
                                     "ask questions over them, and see what the decoder can reconstruct.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("path", help="document: a text, Markdown, HTML or PDF file, a pipe such as <(cmd), "
                       "or - for standard input")
        p.add_argument("--ratio", type=int, choices=RATIOS, default=None,
                       help="encoder tokens per latent (default: the shipped embedded variant whose model card "
                       "reports the best reconstruction, or the checkpoint's own)")
        p.add_argument("--pooling", choices=POOLINGS, default=None,
                       help="default: the best trained pooling at --ratio, or the checkpoint's own")
        p.add_argument("--checkpoint", default=None,
                       help="LCLM directory in the published layout, or a hub id (default: the embedded model)")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
        p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                       help="auto (default, or $LCLM_STUDIO_DTYPE): bfloat16 on CUDA and on CPUs that multiply it "
                       "fast (a short probe decides), else float32")
        p.add_argument("--threads", type=int, default=None,
                       help="torch threads (default, or $LCLM_STUDIO_THREADS: one per core that other processes "
                       "leave free, measured at start: a busy core slows every thread that waits for it)")
        p.add_argument("--no-cache", action="store_true", help="neither read nor write the latent cache")
        p.add_argument("--chunk-tokens", type=int, default=None,
                       help="decoder tokens per EXPAND / reconstruction chunk (default: 256 for EXPAND, as in the "
                       "paper; for reconstruction the span length the variant was trained on, from its model card)")
        p.add_argument("--json", action="store_true", help="print one JSON object")

    common(sub.add_parser("compress", help="compress a document into latents"))
    ask = sub.add_parser("ask", help="answer a question about a document")
    common(ask)
    ask.add_argument("--question", "-q", required=True, action="append",
                     help="repeat to ask several questions in order; each follow-up reuses the document's KV cache "
                     "(with --json: a list of one object per question)")
    ask.add_argument("--mode", choices=(*ANSWER_MODES, "press"), default="lclm",
                     help="; ".join(f"{name}: {METHODS[name].label}, it prepares {METHODS[name].prepares}"
                                    for name in ANSWER_MODES) + "; press: the raw text with its KV cache compressed "
                                                                "by --press")
    ask.add_argument("--press", default=None,
                     help=f"with --mode press: {', '.join(PRESS_METHODS)} (at the matched ratio 1 - 1/N)")
    ask.add_argument("--kv-residual", type=int, default=None,
                     help="with a quantized press: newest positions kept in float (default: 64)")
    ask.add_argument("--max-new-tokens", type=int, default=None, help="default: 128; with expand, 256 per round")
    ask.add_argument("--prompt-profile", choices=PROFILES, default=None,
                     help="paper: the authors' prompts (default for --checkpoint); studio: the studio's short "
                          "prompts (default for the embedded model)")
    ask.add_argument("--decoder", choices=DECODERS, default=None,
                     help="who decodes full context, LCLM and EXPAND: transformers in this process (default, or "
                          "$LCLM_STUDIO_DECODER), or vllm: a vLLM server from the serving environment (make serving), "
                          "started for the call, or the one at --decoder-url")
    ask.add_argument("--decoder-url", action="append", default=None, metavar="URL",
                     help="a vLLM server already running (lclm serve-decoder); implies --decoder vllm; repeatable")
    served = sub.add_parser("serve-decoder", help="serve a variant's decoder with vLLM from prompt embeddings, for "
                            "the studio and the CLI (--decoder-url); runs until interrupted")
    served.add_argument("--ratio", type=int, choices=RATIOS, default=None)
    served.add_argument("--pooling", choices=POOLINGS, default=None)
    served.add_argument("--checkpoint", default=None, help="as for ask (default: the embedded model)")
    served.add_argument("--text", action="store_true",
                        help="serve the decoder that reads raw text (full context: a decoder LoRA's base model)")
    served.add_argument("--port", type=int, default=None, help="default: a free port")
    served.add_argument("--dtype", choices=DTYPE_CHOICES, default=None)
    rec = sub.add_parser("reconstruct", help="let the decoder reproduce each chunk from its latents")
    common(rec)
    rec.add_argument("--max-chunks", type=int, default=None, help="reconstruct only K chunks")
    rec.add_argument("--first-chunk", type=int, default=1, help="the first chunk to reconstruct (from 1; default 1)")
    return parser


class Progress:
    """tqdm bars on stderr, one per stage (windows done, their rate, the time left), and a line per
    stage that has no count; only where stderr is a terminal, so that a script that reads stderr
    finds there only what went wrong."""

    def __init__(self, shown: bool | None = None):
        self.bars: dict[str, object] = {}
        self.shown = sys.stderr.isatty() if shown is None else shown

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if not self.shown:
            return
        if total == 0:  # a message, not a countable stage
            print(f"... {stage}", file=sys.stderr, flush=True)
            return
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit="", file=sys.stderr, leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def serve_decoder(args: argparse.Namespace) -> int:
    """Export the decoder and run its vLLM server in the foreground until interrupted."""
    from app.engine.decoder_server import DecoderServer, context_length, export_decoder, fingerprint
    from app.engine.service import Studio
    from app.engine.settings import Settings

    studio = Studio(Settings.from_env(dtype=args.dtype), checkpoint=args.checkpoint)
    variant = studio.variant(args.checkpoint, args.ratio, args.pooling, progress=Progress())
    model = variant.model
    decoder, decoder_id = ((variant.text_decoder, variant.text_reader_id) if args.text
                           else (model.decoder, model.checkpoint_id))
    dtype = next(decoder.parameters()).dtype
    directory = export_decoder(decoder, model.decoder_tokenizer, decoder_id, studio.settings.data_dir)
    server = DecoderServer(directory, fingerprint(decoder_id, dtype), dtype,
                           context_length(decoder), port=args.port)
    reads = "the document's text" if args.text else f"latents at 1:{variant.ratio} {variant.pooling}"
    print(f"starting vLLM for {decoder_id} (reads {reads}) ...", file=sys.stderr, flush=True)
    server.start()
    print(f"serving {decoder_id} as {server.name} at {server.url} (healthy after {server.start_s:.0f} s; log: "
          f"{server.log_path}); use --decoder-url {server.url}", flush=True)
    try:
        server.process.wait()
    finally:
        server.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    if args.command == "serve-decoder":
        return serve_decoder(args)
    from app.ingest import read_file

    text = read_file(args.path)  # first: a bad path fails at once, and a pipe is read before any model loads
    # Heavy imports here, so that `--help`, argument errors and bad paths are instant.
    from app.engine.service import AskRequest, Studio
    from app.engine.settings import Settings
    from model.threads import apply_threads

    check_press(args)
    from model.errors import UserError

    if args.chunk_tokens is not None and args.chunk_tokens < 1:
        raise UserError(f"--chunk-tokens must be at least 1, got {args.chunk_tokens}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    urls = getattr(args, "decoder_url", None)
    settings = Settings.from_env(device=args.device, dtype=args.dtype, chunk_tokens=args.chunk_tokens,
                                 prompt_profile=getattr(args, "prompt_profile", None),
                                 kv_residual_length=getattr(args, "kv_residual", None),
                                 decoder="vllm" if urls else getattr(args, "decoder", None),
                                 decoder_urls=tuple(urls) if urls else None, threads=args.threads)
    threads = apply_threads(settings.threads)
    studio = Studio(settings, checkpoint=args.checkpoint)
    progress = Progress()
    use_cache = not args.no_cache
    try:
        asked = []  # every question checked before anything loads
        if args.command == "ask":
            mode = args.press if args.mode == "press" else args.mode
            asked = [AskRequest(text, question, mode, args.ratio, args.pooling, max_new_tokens=args.max_new_tokens,
                                use_cache=use_cache) for question in args.question]
        loaded = load_models(studio, args, progress)  # before any clock of the request starts
        process = {"load_ms": loaded, "threads": threads.threads}
        if args.command == "compress":
            result = studio.compress(text, args.ratio, args.pooling, use_cache=use_cache, progress=progress).result
            emit(args, {**result.to_dict(), **process}, compress_text)
        elif args.command == "ask":
            stream = not args.json and sys.stdout.isatty()
            several = len(args.question) > 1
            results = []
            for request in asked:
                if several and not args.json:
                    print(f"Q: {request.question}", flush=True)
                answer = None
                events = studio.ask(request, progress=progress)
                for event in events:
                    if event.kind == "token" and stream:
                        print(event.text, end="", flush=True)
                    elif event.kind == "done":
                        answer = event.answer
                if stream:
                    print()
                results.append({**answer.to_json(), **process})
                if not args.json:
                    print(ask_text(answer, answer_printed=stream) + ("\n" if several else ""), flush=True)
            if args.json:
                print(json.dumps(results if several else results[0], ensure_ascii=False))
        else:
            result = studio.reconstruct(text, args.ratio, args.pooling, use_cache=use_cache, max_chunks=args.max_chunks,
                                        progress=progress, chunk_tokens=args.chunk_tokens, first_chunk=args.first_chunk)
            emit(args, {**result, **process}, reconstruct_text)
    finally:
        progress.close()
        studio.close()
    return 0


def load_models(studio, args: argparse.Namespace, progress) -> float:
    """Load what the command reads (the variant, and for a text-reading mode its decoder) and
    return how long it took, in ms: the process's load time, reported apart from the request's TTFT."""
    started = time.perf_counter()
    variant = studio.variant(None, args.ratio, args.pooling, progress=progress)
    if args.command == "ask" and args.mode not in ("lclm", "expand") and studio.decoders is None:
        variant.text_decoder  # full context and the presses read the text with it
    return round((time.perf_counter() - started) * 1000, 1)


def check_press(args: argparse.Namespace) -> None:
    """--press names a baseline exactly when --mode is press."""
    from model.errors import UserError

    if args.command != "ask":
        return
    if args.kv_residual is not None and args.kv_residual < 1:
        raise UserError(f"--kv-residual must be at least 1, got {args.kv_residual}")
    if args.mode == "press":
        if args.press not in PRESS_METHODS:
            raise UserError(f"--mode press needs --press, one of {', '.join(PRESS_METHODS)}"
                            + (f"; got {args.press!r}" if args.press else ""))
    elif args.press is not None:
        raise UserError("--press is for --mode press")


def emit(args: argparse.Namespace, result: dict, as_text) -> None:
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(as_text(result))


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


def compress_text(r: dict) -> str:
    lines = [
        f"{r['tokens']:,} tokens -> {r['latents']:,} latents (1:{r['ratio']}, {r['pooling']} pooling, "
        f"window {r['window']})",
        f"compress: {r['compress_ms']:.1f} ms{cached_text(r)}; peak memory above the start "
        f"{_mib(r['peak_mem_above_weights_bytes'])}; {r['positions_saved']:,} decoder positions saved; "
        f"{r['chunks']} chunks",
        f"checkpoint: {r['checkpoint']}",
    ]
    if r.get("note"):
        lines.append(f"NOTE: {r['note']}")
    return "\n".join(lines)


def cached_text(r: dict) -> str:
    """Where the latents came from: all from the cache, some windows (a resumed compression), none."""
    if r["cached"]:
        return " (cached)"
    if r.get("cached_windows"):
        return f" ({r['cached_windows']:,} of {r['windows']:,} windows from the cache)"
    return ""


def round_text(rnd: dict) -> str:
    """One EXPAND round in a line, from the fields the round has: its number, action, the chunks
    it expanded and what it ignored."""
    words = [f"round {rnd['number']}:" if "number" in rnd else "round:", str(rnd.get("action", ""))]
    if rnd.get("expanded"):
        words.append("chunks " + ", ".join(str(i) for i in rnd["expanded"]))
    if rnd.get("ignored"):
        words.append("(ignored " + "; ".join(str(i) for i in rnd["ignored"]) + ")")
    return " ".join(w for w in words if w)


def ask_text(a: Answer, answer_printed: bool = False) -> str:
    m = a.measurement
    lines = [] if answer_printed else [a.text, ""]
    lines += [round_text(rnd) for rnd in (a.expand.rounds if a.expand else [])]
    lines += [f"WARNING: {w}" for w in a.warnings]
    if a.expand is not None:
        lines.append(f"answer's first token after {a.expand.answer_ttft_ms:.1f} ms (TTFT below: the first directive's)")
    lines.append(
        f"[{a.method}] TTFT {m.ttft_ms:.1f} ms (compress {m.compress_ms:.1f}, prefill {m.prefill_ms:.1f}, "
        f"first token {m.first_token_ms:.1f}); {m.positions:,} positions"
        f"{reused_text(m)}; KV cache {_mib(m.kv_cache_bytes)}; "
        f"peak memory above the start {_mib(m.peak_mem_above_weights_bytes)}; {m.tokens_per_s:.1f} tokens/s; "
        f"{a.precision['dtype']}"
    )
    if a.note:
        lines.append(f"NOTE: {a.note}")
    return "\n".join(lines)


def reused_text(m: Measurement) -> str:
    reused = m.prefix_reused_positions
    return f" ({reused:,} reused, {m.prefill_positions:,} prefilled)" if reused else ""


def reconstruct_text(r: dict) -> str:
    lines = []
    for c in r["chunks"]:
        lines += [f"--- chunk {c['index']}: token accuracy {c['token_accuracy']:.3f} ({c['reference_tokens']} tokens)",
                  c["reconstructed"]]
    trained = " (the span length it was trained on)" if r.get("trained_span") == r["chunk_tokens"] else ""
    line = (f"overall token accuracy {r['token_accuracy']:.3f} at 1:{r['ratio']} ({r['pooling']}), "
            f"chunks of {r['chunk_tokens']} tokens{trained}")
    from app.engine.service import chunks_shown

    page = chunks_shown(r)
    lines.append(line + (f"; {page}" if page else ""))
    if r.get("note"):
        lines.append(f"NOTE: {r['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from model.errors import UserError
    except ImportError as err:  # pragma: no cover
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    from app.console import user_terminal

    try:
        with user_terminal():
            return run(args)
    except UserError as err:  # out of memory included: the services raise it as OutOfMemory
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
