"""A long document end to end through the command line, as a user runs it: a text of about
100,000 tokens built from this machine's own documentation (`machine_text`), compressed at 1:16
(peak memory above the weights, tokens/s), compressed again after a `kill -9` halfway (the
resumed run says how many windows it took from the cache, and its latents must equal the
uninterrupted run's), then one question over its latents: the time to first token against the
prediction from the encoder's and the decoder's costs measured on short inputs in the same run,
and the decoding rate after that long prefill. Full context's refusal is recorded too. With
--studio-pdf, the studio's services instead, with PDFs of so many pages (`machine_pdf`): load,
compress, the latent map and one page of reconstruction, timed.

    python -m bench.long_document [--tokens 100000] [--ratio 16] [--pooling mean]
    python -m bench.long_document --studio-pdf 150 300

Results: bench/results/long-document.{json,md}, bench/results/long-document-studio.json."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench import save_results
from bench.speed.analytic import Shape
from model.embedded import default_data_dir
from model.precision import cpu_name

DOC_SOURCES = (Path("/usr/share/common-licenses"), Path("/usr/share/doc"))
QUESTION = "Which licence does this document begin with?"
CHARS_PER_TOKEN = 3.5  # a first guess of the text to gather; the tokenizer then trims it exactly
LINES_PER_PAGE, CHARS_PER_LINE = 50, 90  # a page of machine_pdf


def machine_text(tokens: int, tokenizer=None) -> str:
    """About `tokens` tokens of real English from this machine's documentation: the licence texts
    of /usr/share/common-licenses, then the packages' copyright files in /usr/share/doc, in name
    order, repeated if the machine has too few. With `tokenizer`, cut to exactly `tokens` tokens."""
    files = sorted(p for p in DOC_SOURCES[0].glob("*") if p.is_file() and not p.is_symlink())
    files += sorted(DOC_SOURCES[1].glob("*/copyright"))
    if not files:
        raise SystemExit("no documentation found under /usr/share to build a long document from")
    parts, size, want = [], 0, int(tokens * CHARS_PER_TOKEN * 1.2)
    while size < want:
        for path in files:
            try:
                text = path.read_text(errors="replace").strip()
            except OSError:
                continue
            parts.append(f"{path.name if path.parent == DOC_SOURCES[0] else path.parent.name}\n\n{text}\n")
            size += len(parts[-1])
            if size >= want:
                break
    text = "\n".join(parts)
    if tokenizer is None:
        return text
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    if len(enc["input_ids"]) <= tokens:
        return text
    return text[: enc["offset_mapping"][tokens - 1][1]]


def machine_pdf(text: str, pages: int) -> tuple[bytes, list[str]]:
    """A PDF of `pages` pages of `text`'s lines (wrapped, Latin-1, Helvetica), and the lines it holds."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    lines = [piece for line in text.encode("latin-1", "replace").decode("latin-1").splitlines()
             for piece in textwrap.wrap(line, CHARS_PER_LINE)]
    lines = lines[: pages * LINES_PER_PAGE]
    if len(lines) < pages * LINES_PER_PAGE:
        raise ValueError(f"{len(lines)} lines fill fewer than {pages} pages")
    writer = PdfWriter()
    font = writer._add_object(DictionaryObject({
        NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
        NameObject("/BaseFont"): NameObject("/Helvetica")}))
    for first in range(0, len(lines), LINES_PER_PAGE):
        page = writer.add_blank_page(width=612, height=792)
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})})
        shown = [b"(" + line.encode("latin-1").replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")
                 + b") Tj 0 -14 Td" for line in lines[first : first + LINES_PER_PAGE]]
        stream = DecodedStreamObject()
        stream.set_data(b"BT /F1 9 Tf 36 756 Td " + b" ".join(shown) + b" ET")
        page[NameObject("/Contents")] = writer._add_object(stream)
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue(), lines


def cli(args: list[str], home: str | None = None, timeout_s: float = 1800) -> tuple[int, dict | str | None, str]:
    """One `lclm` process, with its data directory at `home` (None: the environment's): (exit
    status, its JSON (its text without --json; None on failure), its standard error)."""
    env = os.environ if home is None else {**os.environ, "LCLM_STUDIO_HOME": home}
    done = subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout_s)
    if done.returncode != 0:
        return done.returncode, None, done.stderr
    return done.returncode, (json.loads(done.stdout) if "--json" in args else done.stdout), done.stderr


def killed_halfway(args: list[str], home: Path, windows: int, share: float) -> int:
    """Start `lclm args` and kill -9 it once the latent cache under `home` holds `share` of the
    document's `windows` encoder windows; how many it held then."""
    from cache import LatentCache

    process = subprocess.Popen([sys.executable, "-m", "app.cli", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "LCLM_STUDIO_HOME": str(home)})
    with LatentCache(home / "latent-cache") as cache:
        while (done := len(cache)) < share * windows:
            if process.poll() is not None:
                raise SystemExit("the compression ended before it could be killed: give a longer document")
            time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return done


def cached_latents(home: str, path: Path, ratio: int, pooling: str) -> torch.Tensor:
    """The document's latents as the cache under `home` holds them (every window must be there)."""
    from app.engine.service import Studio
    from app.engine.settings import Settings
    from app.ingest import read_file

    studio = Studio(Settings(data_dir=home))
    compressed = studio.compress(read_file(str(path)), ratio, pooling)  # the text as the command read it
    if not compressed.result.cached:
        raise SystemExit(f"{home}: not every window of the document was in the cache")
    return compressed.latents


def shared_weights(home: Path) -> None:
    """Point a fresh data directory at the converted weights already made (no second conversion)."""
    source = default_data_dir().resolve()
    home.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.name != "latent-cache" and not (home / entry.name).exists():
            (home / entry.name).symlink_to(entry)


def predicted_ttft_ms(short: dict, long_tokens: int, long_positions: int, decoder: Shape) -> dict:
    """The long question's TTFT from the short one's measured costs: the encoder's ms per token
    times the tokens, and the decoder's ms per analytic FLOP times the long prefill's FLOPs."""
    encoder_ms_per_token = short["compress_ms"] / short["tokens"]
    short_flops = decoder.flops_per_token(short["positions"]) * short["positions"]
    long_flops = decoder.flops_per_token(long_positions) * long_positions
    compress = encoder_ms_per_token * long_tokens
    prefill = short["prefill_ms"] / short_flops * long_flops
    return {"compress_ms": round(compress, 1), "prefill_ms": round(prefill, 1), "ttft_ms": round(compress + prefill, 1),
            "encoder_ms_per_token": round(encoder_ms_per_token, 4)}


def studio_with_pdf(pages: int, ratio: int, pooling: str) -> dict:
    """The studio's services (no browser) with a PDF of `pages` pages of the machine's
    documentation, as the Document, Compress, Latents and Reconstruction tabs use them: the time
    each takes, or the message that refuses the document."""
    from app.engine.service import Studio
    from app.engine.settings import Settings
    from app.studio.catalog import EMBEDDED_FAMILY, build_catalog
    from app.studio.workspace import Workspace
    from model.errors import UserError

    data, _ = machine_pdf(machine_text(pages * LINES_PER_PAGE * CHARS_PER_LINE // 3), pages)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"  # an empty latent cache: every step cold
        shared_weights(home)
        workspace = Workspace(Studio(replace(Settings.from_env(), data_dir=home)), build_catalog())
        variant = workspace.variant(EMBEDDED_FAMILY, ratio, pooling)
        out: dict = {"pages": pages, "pdf_bytes": len(data), "variant": variant.label}
        path = Path(tmp) / "handbook.pdf"
        path.write_bytes(data)
        started = time.perf_counter()
        try:
            document, layout = workspace.load_document(None, str(path), variant)
        except UserError as refused:
            return {**out, "refused": str(refused)}
        out.update(load_s=round(time.perf_counter() - started, 2), tokens=layout.tokens, chunks=layout.chunks,
                   latents=layout.latents)
        steps = {"compress": lambda: workspace.compress(document.sha256, variant),
                 "latent_map": lambda: workspace.latent_map(document.sha256, variant),
                 "reconstruct_page": lambda: workspace.reconstruct(document.sha256, variant, max_chunks=8,
                                                                   chunk=layout.chunks // 2)}
        for name, step in steps.items():
            started = time.perf_counter()
            result = step()
            out[f"{name}_s"] = round(time.perf_counter() - started, 2)
            if name == "latent_map":
                out["map_points"] = result.summary["points"]
                out["map_title"] = result.figure.layout.title.text
        workspace.studio.close()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.long_document", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--short-tokens", type=int, default=16_384, help="the short document the costs come from")
    parser.add_argument("--ratio", type=int, default=16)
    parser.add_argument("--pooling", default="mean")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--kill-at", type=float, default=0.5, help="share of the compression time to kill -9 at")
    parser.add_argument("--studio-pdf", type=int, nargs="+", metavar="PAGES",
                        help="instead: the studio's services with PDFs of these many pages (bench/results/"
                             "long-document-studio.json)")
    parser.add_argument("--out", default="bench/results/long-document")
    args = parser.parse_args(argv)
    if args.studio_pdf:
        runs = [studio_with_pdf(pages, args.ratio, args.pooling) for pages in args.studio_pdf]
        result = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "runs": runs}
        Path(args.out + "-studio.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        return result
    from app.engine.service import Studio
    from app.engine.settings import Settings

    model = Studio(Settings.from_env()).model(None, args.ratio, args.pooling)
    variant = ["--ratio", str(args.ratio), "--pooling", args.pooling]
    out: dict = {"cpu": cpu_name(), "cores": os.cpu_count(), "command": "python -m bench.long_document " + " ".join(
        sys.argv[1:] if argv is None else argv)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        doc, short_doc = tmp / "long.txt", tmp / "short.txt"
        doc.write_text(machine_text(args.tokens, model.encoder_tokenizer))
        short_doc.write_text(machine_text(args.short_tokens, model.encoder_tokenizer))
        homes = {name: tmp / name for name in ("whole", "resumed", "asked")}
        for home in homes.values():
            shared_weights(home)
        print("compressing the whole document ...", flush=True)
        started = time.perf_counter()
        status, whole, err = cli(["compress", str(doc), *variant, "--json"], str(homes["whole"]))
        if status:
            raise SystemExit(err)
        out["compress"] = {**whole, "process_s": round(time.perf_counter() - started, 1)}
        print(f"compressing it again, killed with SIGKILL at {args.kill_at:.0%} of its windows ...", flush=True)
        windows = whole["windows"]
        killed_at = killed_halfway(["compress", str(doc), *variant, "--json"], homes["resumed"], windows, args.kill_at)
        status, resumed, err = cli(["compress", str(doc), *variant], str(homes["resumed"]))
        if status:
            raise SystemExit(err)
        status, resumed_json, _ = cli(["compress", str(doc), *variant, "--json"], str(homes["resumed"]))
        out["resume"] = {"killed_at_windows": killed_at, "windows": windows, "log": resumed.strip().splitlines()[1],
                         "all_cached_afterwards": resumed_json["cached"]}
        equal = torch.equal(cached_latents(str(homes["whole"]), doc, args.ratio, args.pooling),
                            cached_latents(str(homes["resumed"]), doc, args.ratio, args.pooling))
        out["resume"]["latents_equal_uninterrupted"] = equal
        print("asking over the short and the long document ...", flush=True)
        ask = ["-q", QUESTION, "--mode", "lclm", *variant, "--max-new-tokens", str(args.new_tokens), "--json"]
        _, short, err = cli(["ask", str(short_doc), *ask, "--no-cache"], str(homes["asked"]))
        _, long, err = cli(["ask", str(doc), *ask, "--no-cache"], str(homes["asked"]))
        if long is None:
            raise SystemExit(err)
        _, long_cached, _ = cli(["ask", str(doc), *ask], str(homes["whole"]))
        status, _, refusal = cli(["ask", str(doc), "-q", QUESTION, "--mode", "full", "--json"], str(homes["asked"]))
    prediction = predicted_ttft_ms(short, long["tokens"], long["positions"], Shape.from_config(model.decoder.config))
    keep = ("tokens", "latents", "positions", "ttft_ms", "compress_ms", "prefill_ms", "tokens_per_s",
            "peak_mem_above_weights_bytes", "kv_cache_bytes", "dtype", "threads", "load_ms", "answer")
    out["short_question"] = {k: short[k] for k in keep}
    out["long_question"] = {k: long[k] for k in keep}
    out["long_question_cached_latents"] = {k: long_cached[k] for k in keep}
    out["prediction"] = prediction
    out["ttft_over_prediction"] = round(long["ttft_ms"] / prediction["ttft_ms"], 3)
    out["full_context"] = {"exit_status": status, "stderr": refusal.strip()}
    save_results(args.out, out, markdown(out))
    return out


def markdown(out: dict) -> str:
    c, r, q, qc, p = (out["compress"], out["resume"], out["long_question"], out["long_question_cached_latents"],
                      out["prediction"])
    gib = 2**30
    return "\n".join([
        f"# A {c['tokens']:,}-token document at 1:{c['ratio']} ({c['pooling']})", "",
        f"{out['cpu']}, {out['cores']} cores, {q['dtype']}, {q['threads']} thread(s); one `lclm` process per step. "
        f"`{out['command']}`", "",
        "| step | result |", "|---|---|",
        f"| compress | {c['tokens']:,} tokens -> {c['latents']:,} latents in {c['compress_ms'] / 1000:.1f} s "
        f"({c['tokens'] / (c['compress_ms'] / 1000):,.0f} tokens/s); peak memory above the weights "
        f"{c['peak_mem_above_weights_bytes'] / gib:.2f} GiB; load {c['load_ms'] / 1000:.1f} s |",
        f"| kill -9 at window {r['killed_at_windows']} of {r['windows']}, then the same command | `{r['log']}`; "
        f"latents equal to the "
        f"uninterrupted run's: {r['latents_equal_uninterrupted']} |",
        f"| first question, cold (`--no-cache`) | TTFT {q['ttft_ms'] / 1000:.1f} s (compress "
        f"{q['compress_ms'] / 1000:.1f} s + prefill of {q['positions']:,} positions {q['prefill_ms'] / 1000:.1f} s); "
        f"predicted {p['ttft_ms'] / 1000:.1f} s (compress {p['compress_ms'] / 1000:.1f} s + prefill "
        f"{p['prefill_ms'] / 1000:.1f} s) from a {out['short_question']['tokens']:,}-token question: "
        f"{out['ttft_over_prediction']:.2f}x the prediction; decoding {q['tokens_per_s']:.1f} tokens/s; "
        f"peak above the weights {q['peak_mem_above_weights_bytes'] / gib:.2f} GiB; KV cache "
        f"{q['kv_cache_bytes'] / 2**20:.0f} MiB |",
        f"| a question over the cached latents | TTFT {qc['ttft_ms'] / 1000:.1f} s; decoding "
        f"{qc['tokens_per_s']:.1f} tokens/s |",
        f"| full context | exit status {out['full_context']['exit_status']}: `{out['full_context']['stderr']}` |",
    ]) + "\n"


if __name__ == "__main__":
    main()
