"""Checkpoint basics shared by the loader (model/loading.py) and the embedded default
(model/embedded.py): the published layout and where its parts are, the safetensors-only
checks, the memory tokens a decoder needs, and quiet transformers logging while loading.
It imports neither of those modules.

Published layout:
    <checkpoint>/model_config.json
    <checkpoint>/decoder/   full HF causal LM, or a PEFT LoRA (adapter_config.json)
    <checkpoint>/encoder/   full HF base model, or a PEFT LoRA
    <checkpoint>/adapter/adapter.safetensors
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from torch import nn

from model.config import LCLMConfig
from model.errors import CheckpointError
from model.prompts import MEMORY_TOKENS

COMPONENTS = ("decoder", "encoder")
ADAPTER_FILE = Path("adapter") / "adapter.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass
class CheckpointParts:
    """Where the pieces of one LCLM are on disk."""

    config: LCLMConfig
    encoder_dir: Path
    decoder_dir: Path
    adapter_file: Path | None  # None: a freshly initialised adapter (untrained)
    checkpoint_id: str
    trained_span: int | None = None  # span tokens its reconstruction was trained on (model_card.json), if known


# ---- the published layout ---------------------------------------------------------
def has_layout(directory: Path) -> bool:
    return (directory / "model_config.json").is_file() and all((directory / c).is_dir() for c in COMPONENTS)


def find_layout(directory: Path) -> Path:
    """The directory itself, or its newest `checkpoint_<step>/` sub-folder in the published layout."""
    if has_layout(directory):
        return directory
    steps = []
    for sub in directory.glob("checkpoint_*"):
        match = re.fullmatch(r"checkpoint_(\d+)", sub.name)
        if match and has_layout(sub):
            steps.append((int(match.group(1)), sub))
    if steps:
        return max(steps)[1]
    raise CheckpointError(
        f"{directory} is not an LCLM checkpoint: it needs model_config.json, decoder/, encoder/ "
        "(or a checkpoint_<step>/ folder holding them)"
    )


def fingerprint(directory: Path) -> str:
    """Cheap identity of a checkpoint's contents: small files hashed, weight files by name, size and mtime."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(str(path.relative_to(directory)).encode())
        if stat.st_size < 1 << 20:
            digest.update(path.read_bytes())
        else:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def parts_from_directory(directory: Path, checkpoint_id: str | None = None) -> CheckpointParts:
    root = find_layout(directory)
    try:
        config = LCLMConfig.load(root / "model_config.json")
    except (ValueError, TypeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{root / 'model_config.json'} is not a valid LCLM config: {err}") from err
    adapter = root / ADAPTER_FILE
    if not adapter.is_file():
        raise CheckpointError(f"{root} has no {ADAPTER_FILE}")
    return CheckpointParts(
        config=config,
        encoder_dir=root / "encoder",
        decoder_dir=root / "decoder",
        adapter_file=adapter,
        checkpoint_id=checkpoint_id or f"{root.resolve()}@{fingerprint(root)}",
        trained_span=trained_span_tokens(root),
    )


def trained_span_tokens(root: Path) -> int | None:
    """The span length (decoder tokens) of the reconstruction its model card's recipe trained
    last (None: no card, or it does not say)."""
    try:
        phases = json.loads((root / "model_card.json").read_text())["recipe"]["phases"]
        return int(phases[-1]["span_tokens"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


# ---- safetensors only ---------------------------------------------------------------
def refuse_pickles(directory: Path) -> None:
    """Weights must be safetensors files whose headers read; pickles are refused, never opened."""
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickled:
            raise CheckpointError(
                f"{directory} holds pickle weights ({', '.join(sorted(pickled))}); only safetensors are loaded"
            )
        raise CheckpointError(f"{directory} has no safetensors weights")
    for path in weights:
        check_safetensors(path)


def check_safetensors(path: Path) -> None:
    """Read the header of a safetensors file (not its tensors); anything else is refused."""
    try:
        with safe_open(path, framework="pt"):
            pass
    except Exception as err:  # safetensors raises its own error type for a bad header
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None


# ---- components -----------------------------------------------------------------------
def add_memory_tokens(tokenizer, model: nn.Module) -> None:
    """Give the tokenizer the three memory tokens and the model embedding rows for them
    (new rows start at the mean of the existing ones)."""
    missing = [t for t in MEMORY_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)


class quiet_transformers:
    """Silence transformers' per-weight progress bars and warnings while loading."""

    def __enter__(self):
        from transformers.utils import logging

        self._level = logging.get_verbosity()
        logging.set_verbosity_error()
        logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging

        logging.set_verbosity(self._level)
        logging.enable_progress_bar()
