"""One loader for every LCLM: a directory in the published layout, a hub id, or the
embedded default. Each is first resolved to `CheckpointParts` (local paths), then
built by `build_lclm`; `save_lclm` writes the published layout back.

Published layout:
    <checkpoint>/model_config.json
    <checkpoint>/decoder/   full HF causal LM, or a PEFT LoRA (adapter_config.json)
    <checkpoint>/encoder/   full HF base model, or a PEFT LoRA
    <checkpoint>/adapter/adapter.safetensors
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from model.config import LCLMConfig
from model.errors import CheckpointError
from model.lclm import LCLM
from model.prompts import MEMORY_TOKENS

COMPONENTS = ("decoder", "encoder")
ADAPTER_FILE = Path("adapter") / "adapter.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Base models named by LoRA components that are available offline: name -> function(data_dir, kind) -> path.
LOCAL_BASES: dict[str, Callable[[Path, str], Path]] = {}


@dataclass
class CheckpointParts:
    """Where the pieces of one LCLM are on disk."""

    config: LCLMConfig
    encoder_dir: Path
    decoder_dir: Path
    adapter_file: Path | None  # None: a freshly initialised adapter (untrained)
    checkpoint_id: str


# ---- resolving a checkpoint spec to local parts ---------------------------------
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
    )


def hub_is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download_from_hub(repo_id: str) -> Path:
    """Snapshot of a hub checkpoint (the local hub cache first); fails at once when offline."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        pass
    if hub_is_offline():
        raise CheckpointError(f"{repo_id} looks like a model hub id, and the hub is switched off (HF_HUB_OFFLINE)")
    try:
        return Path(snapshot_download(repo_id, etag_timeout=5))
    except Exception as err:
        raise CheckpointError(
            f"could not download {repo_id} from the model hub (offline or not found: {type(err).__name__})"
        ) from err


def resolve(spec: str | None, ratio: int | None = None, pooling: str | None = None, data_dir: Path | None = None,
            progress: Callable[[str], None] | None = None) -> CheckpointParts:
    """Turn a checkpoint spec into local parts. None or "embedded" is the embedded default."""
    if spec in (None, "", "embedded"):
        from model.embedded import embedded_parts

        return embedded_parts(data_dir, ratio=ratio or 16, pooling=pooling or "mean", progress=progress)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {spec} is a file; expected a directory in the LCLM layout")
        parts = parts_from_directory(path)
    elif HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        parts = parts_from_directory(download_from_hub(spec), checkpoint_id=f"hub:{spec}")
    else:
        raise CheckpointError(f"checkpoint {spec} not found: no such directory, and not a model hub id")
    check_variant(parts.config, spec, ratio, pooling)
    return parts


def check_variant(config: LCLMConfig, spec: str, ratio: int | None, pooling: str | None) -> None:
    if ratio is not None and ratio != config.compression_ratio:
        raise CheckpointError(
            f"checkpoint {spec} compresses at 1:{config.compression_ratio}, not 1:{ratio}; choose --ratio {config.compression_ratio}"
        )
    if pooling is not None and pooling != config.pooling:
        raise CheckpointError(f"checkpoint {spec} uses {config.pooling} pooling, not {pooling}")


# ---- building the model from parts -----------------------------------------------
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


def base_of_lora(directory: Path, kind: str, data_dir: Path | None) -> Path:
    """Local path of the base model that a LoRA component names."""
    import model.embedded  # noqa: F401  (registers the embedded base in LOCAL_BASES)

    config = json.loads((directory / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path") or ""
    try:
        return base_path(base, kind, data_dir)
    except CheckpointError:
        raise CheckpointError(
            f"{directory} is a LoRA on {base!r}, which is neither a known base, a directory nor a hub id"
        ) from None


def base_path(base: str, kind: str, data_dir: Path | None) -> Path:
    """Local path of a base model: a LOCAL_BASES name, a directory or a hub id."""
    import model.embedded  # noqa: F401  (registers the embedded base in LOCAL_BASES)

    if base in LOCAL_BASES:
        return LOCAL_BASES[base](data_dir, kind)
    if Path(base).expanduser().is_dir():
        return Path(base).expanduser()
    if HUB_ID.match(base):
        return download_from_hub(base)
    raise CheckpointError(f"base model {base!r} is neither a known base, a directory nor a hub id")


def load_tokenizer(*candidates: Path):
    from transformers import AutoTokenizer

    for directory in candidates:
        if (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(directory)
    raise CheckpointError(f"no tokenizer in {', '.join(str(c) for c in candidates)}")


def add_memory_tokens(tokenizer, model: nn.Module) -> None:
    """Give the tokenizer the three memory tokens and the model embedding rows for them
    (new rows start at the mean of the existing ones)."""
    missing = [t for t in MEMORY_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)


def load_component(directory: Path, kind: str, dtype: torch.dtype, data_dir: Path | None):
    """(model, tokenizer) of the encoder or decoder, full or LoRA."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if kind == "decoder" else AutoModel
    is_lora = (directory / "adapter_config.json").is_file()
    base_dir = base_of_lora(directory, kind, data_dir) if is_lora else directory
    for weights_dir in {directory, base_dir}:
        refuse_pickles(weights_dir)
    tokenizer = load_tokenizer(directory, base_dir)
    try:
        model = auto.from_pretrained(base_dir, dtype=dtype, use_safetensors=True)
    except OSError as err:
        raise CheckpointError(f"cannot load the {kind} from {base_dir}: {err}") from err
    if kind == "decoder":
        add_memory_tokens(tokenizer, model)
    if is_lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, directory).merge_and_unload()
    return model.eval(), tokenizer


def build_lclm(parts: CheckpointParts, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               data_dir: Path | None = None) -> LCLM:
    device = torch.device(device) if device else default_device()
    dtype = dtype or default_dtype(device)
    with quiet_transformers():
        decoder, decoder_tokenizer = load_component(parts.decoder_dir, "decoder", dtype, data_dir)
        encoder, encoder_tokenizer = load_component(parts.encoder_dir, "encoder", dtype, data_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a fresh adapter is the same on every start
        lclm = LCLM(parts.config, encoder, encoder_tokenizer, decoder, decoder_tokenizer, checkpoint_id=parts.checkpoint_id)
    if parts.adapter_file is not None:
        check_safetensors(parts.adapter_file)
        state = load_file(parts.adapter_file)
        try:
            lclm.adapter.load_state_dict(state)
        except RuntimeError as err:
            raise CheckpointError(f"{parts.adapter_file} does not fit this checkpoint's adapter: {err}") from err
    return lclm.to(device=device, dtype=dtype).eval()


def load_lclm(spec: str | None = None, *, ratio: int | None = None, pooling: str | None = None,
              device: str | torch.device | None = None, dtype: torch.dtype | None = None,
              data_dir: Path | None = None, progress: Callable[[str], None] | None = None) -> LCLM:
    """Load an LCLM from a directory, a hub id or (spec None) the embedded default."""
    parts = resolve(spec, ratio=ratio, pooling=pooling, data_dir=data_dir, progress=progress)
    return build_lclm(parts, device=device, dtype=dtype, data_dir=data_dir)


def save_lclm(lclm: LCLM, directory: str | Path) -> Path:
    """Write `lclm` in the published layout with full components (LoRA components are merged)."""
    directory = Path(directory)
    (directory / "adapter").mkdir(parents=True, exist_ok=True)
    lclm.config.save(directory / "model_config.json")
    for kind, model, tokenizer in (
        ("decoder", lclm.decoder, lclm.decoder_tokenizer),
        ("encoder", lclm.encoder.model, lclm.encoder_tokenizer),
    ):
        model.save_pretrained(directory / kind)
        tokenizer.save_pretrained(directory / kind)
    state = {k: v.detach().contiguous().cpu() for k, v in lclm.adapter.state_dict().items()}
    save_file(state, directory / ADAPTER_FILE)
    return directory


# ---- device and quiet loading -------------------------------------------------------
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


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
