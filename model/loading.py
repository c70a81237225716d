"""One loader for every LCLM: a directory in the published layout (model/checkpoint.py), a
hub id, or the embedded default (model/embedded.py). Each is first resolved to
`CheckpointParts` (local paths), then built by `build_lclm`; `save_lclm` writes the
published layout back. `assemble_lclm` puts an LCLM together around loaded components, for
the loader, the studio's variants sharing one model's weights, and training.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model import embedded
from model.checkpoint import (
    ADAPTER_FILE,
    CheckpointParts,
    add_memory_tokens,
    check_safetensors,
    parts_from_directory,
    quiet_transformers,
    refuse_pickles,
)
from model.config import LCLMConfig
from model.errors import CheckpointError
from model.lclm import LCLM

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Base models that LoRA components (and training runs) may name and that are available
# offline: name -> function(data_dir, kind) -> the local directory of that component.
LOCAL_BASES: dict[str, Callable[[Path | None, str], Path]] = {
    embedded.BASE_NAME: embedded.base_component_dir,
}


# ---- resolving a checkpoint spec to local parts ---------------------------------
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
        if ratio is None or pooling is None:  # the best shipped variant (at the ratio given)
            ratio, pooling = embedded.best_variant(ratio, pooling)
        return embedded.embedded_parts(data_dir, ratio=ratio, pooling=pooling, progress=progress)
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
            f"checkpoint {spec} compresses at 1:{config.compression_ratio}, not 1:{ratio}; "
            f"choose --ratio {config.compression_ratio}"
        )
    if pooling is not None and pooling != config.pooling:
        raise CheckpointError(f"checkpoint {spec} uses {config.pooling} pooling, not {pooling}")


def base_of_lora(directory: Path, kind: str, data_dir: Path | None) -> Path:
    """Local path of the base model that a LoRA component names."""
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


# ---- building the model from parts -----------------------------------------------
def load_inference_component(directory: Path, kind: str, dtype: torch.dtype, data_dir: Path | None):
    """(model, tokenizer) of a checkpoint's encoder or decoder for inference: in `dtype`, in
    eval mode, a LoRA component merged into its base."""
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
        decoder, decoder_tokenizer = load_inference_component(parts.decoder_dir, "decoder", dtype, data_dir)
        encoder, encoder_tokenizer = load_inference_component(parts.encoder_dir, "encoder", dtype, data_dir)
    lclm = assemble_lclm(parts.config, encoder, encoder_tokenizer, decoder, decoder_tokenizer,
                         adapter_file=parts.adapter_file, checkpoint_id=parts.checkpoint_id)
    return lclm.to(device=device, dtype=dtype).eval()


def assemble_lclm(config: LCLMConfig, encoder_model: nn.Module, encoder_tokenizer, decoder: nn.Module,
                  decoder_tokenizer, adapter_file: Path | None = None, checkpoint_id: str = "",
                  seed: int = 0) -> LCLM:
    """An LCLM around loaded components. Its adapter is initialised from `seed` (so a fresh
    adapter is the same on every start; the global random state is left as it was), then, given
    `adapter_file`, loaded from it. The components stay where they are; the adapter is new, in
    float32 on the CPU: the caller moves and casts the whole."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lclm = LCLM(config, encoder_model, encoder_tokenizer, decoder, decoder_tokenizer, checkpoint_id=checkpoint_id)
    if adapter_file is not None:
        load_adapter(lclm.adapter, adapter_file)
    return lclm


def load_adapter(adapter: nn.Module, path: Path) -> None:
    """Load `adapter`'s weights from a safetensors file holding exactly its tensors, by name and shape."""
    check_safetensors(path)
    state = load_file(path)
    expected = {name: tuple(tensor.shape) for name, tensor in adapter.state_dict().items()}
    found = {name: tuple(tensor.shape) for name, tensor in state.items()}
    if found != expected:
        problems = []
        if missing := sorted(expected.keys() - found.keys()):
            problems.append(f"missing {', '.join(missing)}")
        if unexpected := sorted(found.keys() - expected.keys()):
            problems.append(f"unexpected {', '.join(unexpected)}")
        problems += [f"{name} is {list(found[name])}, not {list(expected[name])}"
                     for name in sorted(expected.keys() & found.keys()) if found[name] != expected[name]]
        raise CheckpointError(f"{path} does not fit this checkpoint's adapter: {'; '.join(problems)}")
    adapter.load_state_dict(state)


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


# ---- device and dtype ----------------------------------------------------------------
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32
