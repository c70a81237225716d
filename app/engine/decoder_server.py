"""The decoder served by vLLM, for many users at once: the studio builds the prompt embeddings
exactly as it does in-process (chat frame, latents spliced at the memory positions) and sends
them to a vLLM server's OpenAI-compatible API (`/v1/completions` with `prompt_embeds`), which
batches the decoding of every user's question; the encoder and the latent cache stay here.

- `export_decoder`: a decoder as a directory vLLM loads (safetensors, config, tokenizer), kept in
  the data directory under its fingerprint, written once. The LCLM decoders are exported with
  their LoRA merged (model/loading.py merges it at load) and the memory-tag rows in place; full
  context reads the base decoder, exported as its own directory.
- `DecoderServer`: one vLLM server process on 127.0.0.1, started from the serving environment
  (`make serving`: .venv-serving), healthy or stopped with the log's last lines.
- `ServedDecoder`: the client of one served decoder: streams a reply's text pieces.
- `DecoderServers`: which server serves which decoder: started on first use (at most
  `max_servers`, the least recently used stopped first), or attached with `--decoder-url`.

Only torch.save writes the embeddings sent (the wire format vLLM reads); nothing received is
unpickled here: replies are JSON.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import io
import json
import logging
import os
import socket
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from torch import nn

from model.errors import UserError
from model.generation import Sampling

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
SERVING_PYTHON_ENV = "LCLM_SERVING_PYTHON"  # the serving environment's python (default .venv-serving/bin/python)
DEFAULT_SERVING_PYTHON = ROOT / ".venv-serving" / "bin" / "python"
START_TIMEOUT_S = 600.0  # a cold vLLM start on a busy 2-core CPU takes 2-4 minutes
KV_CACHE_GIB = 1  # VLLM_CPU_KVCACHE_SPACE: the server's KV cache on a CPU, GiB


def serving_python() -> Path:
    python = Path(os.environ.get(SERVING_PYTHON_ENV) or DEFAULT_SERVING_PYTHON)
    if not python.is_file():
        raise UserError(f"the serving environment is not installed ({python} is missing): run `make serving`, "
                        f"or set {SERVING_PYTHON_ENV} to a python that has vLLM")
    return python


def fingerprint(decoder_id: str, dtype: torch.dtype) -> str:
    """A served decoder's name: whose weights (checkpoint id, or base:DIR) in which dtype."""
    return "lclm-" + hashlib.sha256(f"{decoder_id}|{dtype}".encode()).hexdigest()[:16]


def export_decoder(decoder: nn.Module, tokenizer, decoder_id: str, data_dir: Path) -> Path:
    """`decoder` (a transformers causal LM, LoRA merged) as a directory vLLM loads, under
    data_dir/served/<fingerprint>; written once (a finished export has its marker file)."""
    name = fingerprint(decoder_id, next(decoder.parameters()).dtype)
    out = Path(data_dir) / "served" / name
    if (out / ".exported").is_file():
        return out
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    decoder.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    (partial / ".exported").write_text(json.dumps({"decoder": decoder_id}))
    if out.exists():  # another process exported it meanwhile
        return out
    partial.rename(out)
    return out


def context_length(decoder: nn.Module) -> int:
    """The positions a served decoder takes: its config's limit (4,096 where it names none)."""
    return int(getattr(decoder.config, "max_position_embeddings", 4096))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def embeds_payload(embeds: torch.Tensor) -> str:
    """[P, D] prompt embeddings in vLLM's wire format: base64 of torch.save's bytes."""
    buffer = io.BytesIO()
    torch.save(embeds.detach().to("cpu").contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class Streamed:
    """What a streamed reply's end says: its token ids, how many and why it ended ("stop", "length")."""

    token_ids: list[int] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None


class ServedDecoder:
    """The client of one decoder served at `url` under `model` (its fingerprint)."""

    def __init__(self, url: str, model: str, dtype: torch.dtype):
        self.url, self.model, self.dtype = url.rstrip("/"), model, dtype

    def stream(self, embeds: torch.Tensor, max_tokens: int, stop_token_ids: list[int], sampling: Sampling,
               done: Streamed | None = None) -> Iterator[str]:
        """Stream the text of one reply to `embeds` [P, D]; `done` gets its token count and why
        it ended. Closing the generator early stops the request."""
        body = {"model": self.model, "prompt_embeds": embeds_payload(embeds.to(self.dtype)),
                "max_tokens": max_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
                "top_k": sampling.top_k or -1, "repetition_penalty": sampling.repetition_penalty,
                "seed": sampling.seed, "stop_token_ids": stop_token_ids, "skip_special_tokens": True,
                "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
        done = done if done is not None else Streamed()
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=httpx.Timeout(600.0)) as r:
                if r.status_code != 200:
                    raise UserError(f"the decoder server at {self.url} refused the request "
                                    f"({r.status_code}): {r.read().decode(errors='replace')[:300]}")
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        done.tokens = int(chunk["usage"].get("completion_tokens", done.tokens))
                    for choice in chunk.get("choices", []):
                        done.finish_reason = choice.get("finish_reason") or done.finish_reason
                        done.token_ids += choice.get("token_ids") or []
                        if choice.get("text"):
                            yield choice["text"]
        except httpx.TransportError as err:
            raise UserError(f"the decoder server at {self.url} cannot be reached ({type(err).__name__}): "
                            "is it running?") from err


def served_models(url: str) -> list[str]:
    try:
        r = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=10.0)
        r.raise_for_status()
    except httpx.HTTPError as err:
        raise UserError(f"the decoder server at {url} cannot be reached ({type(err).__name__}): is it running?") \
            from err
    return [m["id"] for m in r.json().get("data", [])]


class DecoderServer:
    """One vLLM server for the decoder in `model_dir`, on 127.0.0.1, served as `name`."""

    def __init__(self, model_dir: Path, name: str, dtype: torch.dtype, max_model_len: int,
                 port: int | None = None, log_dir: Path | None = None):
        self.model_dir, self.name, self.dtype, self.max_model_len = Path(model_dir), name, dtype, max_model_len
        self.port = port or free_port()
        self.log_path = Path(log_dir or model_dir) / f"vllm-{self.port}.log"
        self.process: subprocess.Popen | None = None
        self.start_s: float | None = None  # seconds from start to healthy

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [str(serving_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                "--served-model-name", self.name, "--enable-prompt-embeds", "--host", "127.0.0.1",
                "--port", str(self.port), "--dtype", str(self.dtype).removeprefix("torch."), "--enforce-eager",
                "--max-model-len", str(self.max_model_len), "--disable-log-stats"]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> DecoderServer:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(KV_CACHE_GIB)),
               "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        started = time.monotonic()
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"the vLLM server for {self.model_dir.name} exited with status "
                                f"{self.process.returncode} before it was healthy:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    self.start_s = time.monotonic() - started
                    log.info("vLLM server for %s healthy at %s after %.1f s", self.name, self.url, self.start_s)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise UserError(f"the vLLM server for {self.model_dir.name} was not healthy after {timeout_s:.0f} s:\n"
                        f"{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, 15)
            self.process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, 9)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=30)


class DecoderServers:
    """Which vLLM server serves which decoder. `urls`: servers already running (each serves the
    decoders it lists under their fingerprints); a decoder none of them serves gets a server of
    its own, started here on first use (with `start` on; at most `max_servers` at once)."""

    def __init__(self, data_dir: Path, urls: list[str] = (), start: bool = True, max_servers: int = 2,
                 max_model_len: int | None = None):
        self.data_dir, self.urls, self.may_start = Path(data_dir), list(urls), start
        self.max_servers, self.max_model_len = max_servers, max_model_len
        self._started: OrderedDict[str, DecoderServer] = OrderedDict()
        self._starting: dict[str, threading.Lock] = {}  # decoder name -> held while its server starts
        self._lock = threading.Lock()
        atexit.register(self.close)  # the servers started here end with this process

    def client(self, decoder: nn.Module, tokenizer, decoder_id: str) -> ServedDecoder:
        """The client for `decoder` (whose weights `decoder_id` names), starting its server if
        needed. A start (tens of seconds) holds only that decoder's lock: questions for decoders
        already served go on meanwhile."""
        dtype = next(decoder.parameters()).dtype
        name = fingerprint(decoder_id, dtype)
        with self._lock:
            found = self._served(name, dtype)
            if found is not None:
                return found
            if not self.may_start:
                raise UserError(f"no decoder server serves {decoder_id} ({name}); start one with "
                                f"`lclm serve-decoder` and give its address with --decoder-url")
            starting = self._starting.setdefault(name, threading.Lock())
        with starting:  # one start per decoder; who waited here finds it started
            with self._lock:
                found = self._served(name, dtype)
            if found is not None:
                return found
            model_dir = export_decoder(decoder, tokenizer, decoder_id, self.data_dir)
            with self._lock:
                while len(self._started) >= self.max_servers:
                    _, oldest = self._started.popitem(last=False)
                    oldest.stop()
            length = self.max_model_len or context_length(decoder)
            server = DecoderServer(model_dir, name, dtype, length, log_dir=self.data_dir / "served" / "logs")
            log.info("starting a vLLM server for %s at %s", decoder_id, server.url)
            server.start()
            with self._lock:
                self._started[name] = server
            return ServedDecoder(server.url, name, dtype)

    def _served(self, name: str, dtype: torch.dtype) -> ServedDecoder | None:
        """The client of a server that serves `name` already (call with the lock held)."""
        for url in self.urls:
            if name in served_models(url):
                return ServedDecoder(url, name, dtype)
        if name in self._started:
            self._started.move_to_end(name)
            return ServedDecoder(self._started[name].url, name, dtype)
        return None

    def close(self) -> None:
        with self._lock:
            while self._started:
                self._started.popitem()[1].stop()
