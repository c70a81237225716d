"""How vLLM should serve a variant's decoder, measured: its merged export (what the studio serves)
against the base decoder with the variant's decoder LoRA as a vLLM LoRA module (`--enable-lora`).
The same LCLM prompts (the embedded 1:16 mean variant, 4,000-token documents, the question
prompt with the latents spliced in) go to each server after one warm-up request: the replies, the
median time of one request (half the documents, one at a time), the other half at once, the
server's RSS and its start.

    .venv/bin/python -m bench.serving_choice [--ratio 16 --pooling mean] [--documents 12]

vLLM's LoRA loader takes no trainable-token rows (PEFT's `trainable_token_indices`, where the
studio's decoder LoRAs keep the trained memory-tag rows); the prompt embeddings the studio sends
already hold those rows, so the LoRA module is a copy of the LoRA without them.
Results: bench/results/serving-choice.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file, save_file

from app.engine.decoder_server import (
    DecoderServer,
    ServedDecoder,
    Streamed,
    context_length,
    export_decoder,
    fingerprint,
)
from app.engine.latent_store import text_document
from app.engine.methods import memory_region_ids, prompt_parts
from app.engine.service import Studio
from app.engine.settings import Settings
from bench.load import MIB, long_document, rss
from model.generation import Sampling, stop_token_ids
from model.loading import resolve

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is the code of this report?"


def lora_without_token_rows(lora_dir: Path, out: Path) -> Path:
    """A copy of a PEFT LoRA without its trainable-token rows, which vLLM's loader refuses."""
    out.mkdir(parents=True, exist_ok=True)
    weights = load_file(lora_dir / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "trainable_tokens" not in k}, out / "adapter_model.safetensors")
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    config["trainable_token_indices"] = None
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out


def measure(server: DecoderServer, model_name: str, prompts: list[torch.Tensor], stops: list[int],
            max_tokens: int) -> dict:
    started = time.perf_counter()
    server.start()
    start_s = time.perf_counter() - started
    client = ServedDecoder(server.url, model_name, server.dtype)

    def ask(embeds: torch.Tensor) -> tuple[str, float]:
        begun = time.perf_counter()
        text = "".join(client.stream(embeds, max_tokens, stops, Sampling(), Streamed()))
        return text, time.perf_counter() - begun

    half = len(prompts) // 2  # one at a time, then the others at once (new prompts: no prefix cache hit)
    try:
        ask(prompts[-1])  # warm-up: the first request of a server (a LoRA module loads on it)
        alone = [ask(e) for e in prompts[:half]]
        begun = time.perf_counter()
        with ThreadPoolExecutor(len(prompts) - half) as pool:
            together = list(pool.map(ask, prompts[half:]))
        together_s = time.perf_counter() - begun
        memory = rss(server.process.pid)
    finally:
        server.stop()
    return {"start_s": round(start_s, 1), "request_median_s": round(statistics.median(t for _, t in alone), 3),
            "requests_at_once": len(together), "all_at_once_s": round(together_s, 3), "rss_mib": round(memory / MIB),
            "replies": [r for r, _ in alone + together]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=int, default=16)
    parser.add_argument("--pooling", default="mean")
    parser.add_argument("--documents", type=int, default=12, help="half asked one at a time, half at once")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serving-choice.json"))
    args = parser.parse_args(argv)
    studio = Studio(Settings.from_env())
    variant = studio.variant(None, args.ratio, args.pooling)
    model = variant.model
    if not variant.reads_text_with_base:
        raise SystemExit("error: this variant's decoder is not a LoRA: nothing to compare")
    prompts = []
    for n in range(args.documents):
        text = long_document(n, 4000)
        latents, _, _ = studio.store.latents(model, text_document(model, text, studio.tokenize(model, text).ids))
        before, after = prompt_parts(model, variant.profile, QUESTION)
        ids = before + memory_region_ids(model, int(latents.shape[0])) + after  # [P]
        prompts.append(model.prepare_ids(ids, [latents]).inputs_embeds[0])  # [P, D]
    stops = sorted(stop_token_ids(model.decoder_tokenizer, model.decoder))
    data = studio.settings.data_dir
    dtype = next(model.decoder.parameters()).dtype
    merged = export_decoder(model.decoder, model.decoder_tokenizer, model.checkpoint_id, data)
    base = export_decoder(variant.text_decoder, model.decoder_tokenizer, variant.text_reader_id, data)
    length = context_length(model.decoder)
    with tempfile.TemporaryDirectory() as scratch:
        lora = lora_without_token_rows(resolve(None, args.ratio, args.pooling).decoder_dir, Path(scratch) / "lora")
        merged_server = DecoderServer(merged, fingerprint(model.checkpoint_id, dtype), dtype, length,
                                      log_dir=Path(scratch))
        lora_server = DecoderServer(base, "base", dtype, length, log_dir=Path(scratch))
        lora_command = lora_server.command
        lora_server.command = lambda: [*lora_command(), "--enable-lora", "--max-lora-rank", "64",
                                       "--lora-modules", f"variant={lora}"]
        result = {"variant": f"1:{args.ratio} {args.pooling}", "dtype": str(dtype).removeprefix("torch."),
                  "documents": args.documents, "document_tokens": 4000, "max_new_tokens": args.max_new_tokens,
                  "cpus": psutil.cpu_count(),
                  "merged": measure(merged_server, merged_server.name, prompts, stops, args.max_new_tokens),
                  "lora_module": measure(lora_server, "variant", prompts, stops, args.max_new_tokens)}
    result["same_replies"] = result["merged"]["replies"] == result["lora_module"]["replies"]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "replies"} if isinstance(v, dict) else v)
                      for k, v in result.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
