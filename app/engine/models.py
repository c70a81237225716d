"""The model pool: every LCLM this process has loaded, once each, with the variants of one
encoder/decoder pair (the embedded ratios and poolings) sharing its weights; and the variant
object every request runs on.

A `LoadedVariant` is what the services, the methods (app/engine/methods.py) and the benchmarks pass
around instead of loose (checkpoint, ratio, pooling, dtype, prompt profile) arguments.

A variant whose decoder is a LoRA (trained to read latents; the embedded trained variants)
reads latents with that decoder, but full context and the KV-cache presses read the document's
text with the LoRA's base model, loaded on first use and once per process: they are the
uncompressed baselines the LCLM is measured against, and a decoder tuned to read latents need
not read text as well as its base does."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from app.engine.memory import guard_memory
from app.engine.settings import POOLINGS, RATIOS, Settings
from model.checkpoint import CheckpointParts, quiet_transformers
from model.errors import UserError
from model.lclm import LCLM
from model.loading import assemble_lclm, base_of_lora, build_lclm, default_device, load_inference_component, resolve
from model.precision import DtypeChoice, choose_dtype
from model.prompts import PROMPT_PROFILES, PromptProfile, default_prompt_profile

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total); total 0 for a message


@dataclass(frozen=True)
class LoadedVariant:
    """One LCLM (its checkpoint, ratio and pooling), the dtype it runs in and the prompt profile
    its questions are put in."""

    model: LCLM
    profile: PromptProfile
    precision: DtypeChoice
    base_decoder: Callable[[], nn.Module] | None = None  # the decoder LoRA's base model, loaded once
    base_dir: Path | None = None  # where that base model is

    @property
    def text_decoder(self) -> nn.Module:
        """The decoder that reads the document as text (full context, the presses): the base
        model of a decoder LoRA, else the LCLM's own decoder."""
        return self.base_decoder() if self.base_decoder else self.model.decoder

    @property
    def reads_text_with_base(self) -> bool:
        return self.base_decoder is not None

    @property
    def text_reader_id(self) -> str:
        """Which weights read the document as text: variants that share a decoder LoRA's base
        (the embedded ratios and poolings) share it, so full context's cached prefix survives a
        change of ratio."""
        return f"base:{self.base_dir}" if self.reads_text_with_base else self.model.checkpoint_id

    @property
    def ratio(self) -> int:
        return self.model.config.compression_ratio

    @property
    def pooling(self) -> str:
        return self.model.config.pooling

    @property
    def checkpoint_id(self) -> str:
        return self.model.checkpoint_id

    @property
    def trained(self) -> bool:
        return self.model.config.trained


class ModelPool:
    """LCLMs by (checkpoint, device, dtype), loaded on first use. Models built elsewhere (a
    benchmark's random-weight pair) are added with `add` under a checkpoint name of their own."""

    def __init__(self, settings: Settings, default_checkpoint: str | None = None):
        self.settings = settings
        self.default_checkpoint = default_checkpoint
        self._models: dict[tuple, LCLM] = {}
        self._parts: dict[tuple, CheckpointParts] = {}
        self._lora_bases: dict[tuple, Path | None] = {}  # per loaded model: its decoder LoRA's base
        self._base_decoders: dict[tuple, nn.Module] = {}
        self._added: dict[tuple[str, int, str], LCLM] = {}
        self._dtype: DtypeChoice | None = None
        self._lock = threading.RLock()

    def dtype_choice(self) -> DtypeChoice:
        """The dtype every model of this process runs in (settings.dtype on this device), and why."""
        with self._lock:
            if self._dtype is None:
                self._dtype = choose_dtype(self.settings.dtype, self.settings.device or default_device())
            return self._dtype

    def add(self, checkpoint: str, lclm: LCLM) -> None:
        """Offer a model built elsewhere as `checkpoint` at its own ratio and pooling."""
        with self._lock:
            self._added[(checkpoint, lclm.config.compression_ratio, lclm.config.pooling)] = lclm

    def model(self, checkpoint: str | None = None, ratio: int | None = None, pooling: str | None = None,
              progress: ProgressFn | None = None) -> LCLM:
        """The LCLM for this checkpoint and variant, loaded once per process."""
        checkpoint = checkpoint if checkpoint is not None else self.default_checkpoint
        with self._lock:
            added = [m for (name, r, p), m in self._added.items() if name == checkpoint
                     and ratio in (None, r) and pooling in (None, p)]
            if added:
                return added[0]
            validate_choice(ratio, pooling)
            say = (lambda message: progress(message, 0, 0)) if progress else None
            parts = resolve(checkpoint, ratio=ratio, pooling=pooling, data_dir=self.settings.data_dir, progress=say)
            key = (parts.checkpoint_id, self.settings.device, self.dtype_choice().dtype)
            if key not in self._models:
                if say:
                    say(f"loading {parts.checkpoint_id}")
                self._models[key] = guard_memory(self._build, parts, message=(
                    f"out of memory while loading {parts.checkpoint_id}; free memory on the device, or use "
                    "--device cpu or a smaller model"))
                self._parts[key] = parts
            return self._models[key]

    def _build(self, parts: CheckpointParts) -> LCLM:
        """Load a variant; one whose encoder and decoder come from the same directories as a
        loaded model's (the embedded ratios and poolings) shares that model's weights."""
        for key, loaded_parts in self._parts.items():
            if (loaded_parts.encoder_dir, loaded_parts.decoder_dir, loaded_parts.config.encoder_mask_type) == (
                    parts.encoder_dir, parts.decoder_dir, parts.config.encoder_mask_type):
                return share_weights(self._models[key], parts)
        return build_lclm(parts, device=self.settings.device, dtype=self.dtype_choice().dtype,
                          data_dir=self.settings.data_dir)

    def prompt_profile(self, model: LCLM, name: str | None = None) -> PromptProfile:
        """The named profile, else the settings' one, else the checkpoint's default."""
        name = name or self.settings.prompt_profile or default_prompt_profile(model.checkpoint_id)
        if name not in PROMPT_PROFILES:
            raise UserError(f"prompt profile must be one of {', '.join(PROMPT_PROFILES)}, got {name!r}")
        return PROMPT_PROFILES[name]

    def variant(self, checkpoint: str | None = None, ratio: int | None = None, pooling: str | None = None,
                prompt_profile: str | None = None, progress: ProgressFn | None = None) -> LoadedVariant:
        model = self.model(checkpoint, ratio, pooling, progress)
        base = self.decoder_lora_base(model)
        base_decoder = (lambda: self.base_decoder(base, model.device)) if base else None
        return LoadedVariant(model, self.prompt_profile(model, prompt_profile), self.dtype_choice(), base_decoder, base)

    def trained_span(self, model: LCLM) -> int | None:
        """The span length its reconstruction was trained on (its model card), if known."""
        with self._lock:
            key = next((k for k, loaded in self._models.items() if loaded is model), None)
            return self._parts[key].trained_span if key is not None else None

    def decoder_lora_base(self, model: LCLM) -> Path | None:
        """The base model's directory when `model` was loaded with a decoder LoRA, else None."""
        with self._lock:
            key = next((k for k, loaded in self._models.items() if loaded is model), None)
            if key is None:  # a model added with `add`: no parts on disk
                return None
            if key not in self._lora_bases:
                decoder_dir = self._parts[key].decoder_dir
                is_lora = (decoder_dir / "adapter_config.json").is_file()
                self._lora_bases[key] = (base_of_lora(decoder_dir, "decoder", self.settings.data_dir).resolve()
                                         if is_lora else None)
            return self._lora_bases[key]

    def base_decoder(self, base_dir: Path, device: torch.device) -> nn.Module:
        """The decoder in `base_dir` (memory tokens added, as every LCLM decoder has them), once
        per process: a loaded variant's decoder when one reads that directory as it is."""
        dtype = self.dtype_choice().dtype
        with self._lock:
            key = (base_dir, str(device), dtype)
            if key not in self._base_decoders:
                same = [model.decoder for k, model in self._models.items()
                        if self._parts[k].decoder_dir.resolve() == base_dir and model.device == device]
                self._base_decoders[key] = same[0] if same else guard_memory(
                    self._load_base_decoder, base_dir, device, message=(
                        f"out of memory while loading the base decoder {base_dir} for full context; free memory "
                        "on the device, or use --device cpu"))
            return self._base_decoders[key]

    def _load_base_decoder(self, base_dir: Path, device: torch.device) -> nn.Module:
        dtype = self.dtype_choice().dtype
        with quiet_transformers():
            decoder, _ = load_inference_component(base_dir, "decoder", dtype, self.settings.data_dir)
        return decoder.to(device=device, dtype=dtype)


def share_weights(loaded: LCLM, parts: CheckpointParts) -> LCLM:
    """A new LCLM variant around `loaded`'s encoder and decoder, with its own config and adapter
    (assembled as `build_lclm` does: the same fresh adapter, or the checkpoint's, checked)."""
    lclm = assemble_lclm(parts.config, loaded.encoder.model, loaded.encoder_tokenizer, loaded.decoder,
                         loaded.decoder_tokenizer, adapter_file=parts.adapter_file, checkpoint_id=parts.checkpoint_id)
    return lclm.to(device=loaded.device, dtype=loaded.dtype).eval()


def validate_choice(ratio: int | None, pooling: str | None) -> None:
    if ratio is not None and ratio not in RATIOS:
        raise UserError(f"ratio must be one of {', '.join(map(str, RATIOS))}, got {ratio!r}")
    if pooling is not None and pooling not in POOLINGS:
        raise UserError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
