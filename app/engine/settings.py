"""Settings of the studio and the CLI, from defaults and environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from app.engine.kv_cache import default_size_mb
from model.agent import DEFAULT_ROUNDS
from model.chunking import DEFAULT_CHUNK_TOKENS
from model.config import RATIOS  # noqa: F401 (the studio's choices: app.engine.settings.RATIOS)
from model.embedded import default_data_dir
from model.pooling import POOLINGS as POOLING_CLASSES
from model.precision import DTYPE_CHOICES
from model.prompts import PROMPT_PROFILES

POOLINGS = tuple(POOLING_CLASSES)  # model/pooling.py registers them
PROFILES = tuple(PROMPT_PROFILES)
DECODERS = ("transformers", "vllm")  # who decodes: this process, or vLLM servers (app/engine/decoder_server.py)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


@dataclass
class Settings:
    """Everything configurable. Environment variables (read by `from_env`):
    LCLM_STUDIO_HOME (data dir), LCLM_STUDIO_CACHE_MB, LCLM_STUDIO_MAX_TOKENS,
    LCLM_STUDIO_CHUNK_TOKENS, LCLM_STUDIO_PROMPT_PROFILE, LCLM_STUDIO_DEVICE, LCLM_STUDIO_DTYPE,
    LCLM_STUDIO_KV_CACHE_MB, LCLM_STUDIO_KV_RESIDUAL, LCLM_STUDIO_STOP_AT_REPEAT (0: plain greedy),
    LCLM_STUDIO_DECODER (transformers or vllm), LCLM_STUDIO_DECODER_URL (vLLM servers, comma-separated),
    LCLM_STUDIO_THREADS (torch threads; default: the cores other processes leave free)."""

    data_dir: Path = field(default_factory=default_data_dir)
    cache_size_mb: int = 2048
    max_document_tokens: int = 131072
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS  # decoder tokens per EXPAND / reconstruction chunk
    max_expand_rounds: int = DEFAULT_ROUNDS  # EXPAND decision rounds, before the forced final one
    max_new_tokens: int = 128
    expand_new_tokens: int = 256  # new tokens per EXPAND round when a request names none
    prompt_profile: str | None = None  # None: per checkpoint (model.prompts.default_prompt_profile)
    device: str | None = None  # None: CUDA when present, else CPU
    kv_cache_mb: int = field(default_factory=default_size_mb)  # prefix KV caches kept in memory; 0: none
    dtype: str = "auto"  # auto: bfloat16 where the device computes it fast (model.precision), else float32
    kv_residual_length: int = 64  # newest positions a quantized KV cache keeps in float (model.quantized_cache)
    stop_at_repeat: bool = True  # end an answer at a sentence it already wrote (the benchmarks: False, plain greedy)
    decoder: str = "transformers"  # who decodes full context, LCLM and EXPAND: transformers here, or vllm servers
    decoder_urls: tuple[str, ...] = ()  # vLLM servers already running (with decoder "vllm"); others start on use
    threads: int | None = None  # torch threads the commands set (None: a core each that others leave free)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser()
        if self.max_document_tokens < 1:
            raise ValueError("max_document_tokens must be positive")
        if self.chunk_tokens < 1:
            raise ValueError("chunk_tokens must be positive")
        if self.kv_residual_length < 1:
            raise ValueError("kv_residual_length must be at least 1")
        if self.max_expand_rounds < 1:
            raise ValueError("max_expand_rounds must be at least 1")
        if self.prompt_profile is not None and self.prompt_profile not in PROMPT_PROFILES:
            raise ValueError(f"prompt_profile must be one of {', '.join(PROMPT_PROFILES)}, got {self.prompt_profile!r}")
        if self.kv_cache_mb < 0:
            raise ValueError("kv_cache_mb must be 0 (no prefix reuse) or more")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        self.decoder_urls = tuple(self.decoder_urls)
        if self.decoder_urls and self.decoder != "vllm":
            raise ValueError("decoder URLs are vLLM servers: give them with decoder vllm")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "latent-cache"

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        values = dict(
            data_dir=default_data_dir(),
            cache_size_mb=_env_int("LCLM_STUDIO_CACHE_MB", cls.cache_size_mb),
            max_document_tokens=_env_int("LCLM_STUDIO_MAX_TOKENS", cls.max_document_tokens),
            chunk_tokens=_env_int("LCLM_STUDIO_CHUNK_TOKENS", cls.chunk_tokens),
            device=os.environ.get("LCLM_STUDIO_DEVICE") or None,
            prompt_profile=os.environ.get("LCLM_STUDIO_PROMPT_PROFILE") or None,
            dtype=os.environ.get("LCLM_STUDIO_DTYPE") or cls.dtype,
            kv_cache_mb=_env_int("LCLM_STUDIO_KV_CACHE_MB", default_size_mb()),
            kv_residual_length=_env_int("LCLM_STUDIO_KV_RESIDUAL", cls.kv_residual_length),
            stop_at_repeat=bool(_env_int("LCLM_STUDIO_STOP_AT_REPEAT", int(cls.stop_at_repeat))),
            decoder=os.environ.get("LCLM_STUDIO_DECODER") or cls.decoder,
            decoder_urls=tuple(u for u in os.environ.get("LCLM_STUDIO_DECODER_URL", "").split(",") if u),
            threads=_env_int("LCLM_STUDIO_THREADS", 0) or None,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
