"""What the speed benchmark measures: a "rig" is one encoder and one decoder, with an LCLM per
compression ratio sharing their weights, plus the decoder prompt around the document.

Two ways to build one:
- `checkpoint_rig`: a real LCLM through the app's loader (`model.loading.load_lclm`), the
  embedded SmolLM2-135M default unless a checkpoint is named (CPU, float32).
- `random_pair_rig`: an encoder and a decoder built from Qwen3 config objects with random
  weights, shaped like the paper's pair (Qwen3-Embedding-0.6B + Qwen3-4B-Instruct-2507) or
  tiny (tests). Weights do not change speed and nothing is downloaded; the tokenizer is a
  minimal word-level one that knows the chat and memory tokens (documents are random ids).
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from app.engine.methods import prompt_parts
from app.engine.models import LoadedVariant
from app.engine.service import Studio
from app.engine.settings import Settings
from bench.speed.analytic import Shape
from model.config import LCLMConfig
from model.lclm import LCLM
from model.pooling import make_pooling
from model.prompts import CHATML_TEMPLATE, MEMORY_TOKENS, PROMPT_PROFILES

QUESTION = "What is the special magic number mentioned in the document?"
PROMPT_PROFILE = "studio"  # the studio's short question prompt
RIG_CHECKPOINT = "benchmark rig"  # the name the rig's LCLMs have in its studio's model pool


@dataclass
class Rig:
    name: str
    lclms: dict[int, LCLM]  # ratio -> LCLM; all share one encoder model and one decoder
    before: list[int]  # decoder ids of the question prompt before the document
    after: list[int]  # ... and after it (question, end of turn, assistant header)
    doc_vocab: torch.Tensor  # [V] ids a document is drawn from (no special tokens)
    studio: Studio  # answers every request, with the LCLMs above in its model pool
    notes: list[str] = field(default_factory=list)

    def variant(self, ratio: int | None) -> LoadedVariant:
        """The LCLM at 1:ratio (any, for methods without a ratio) in the benchmark's prompt profile."""
        lclm = self.lclms[ratio] if ratio is not None else self.any_lclm
        return self.studio.variant(RIG_CHECKPOINT, lclm.config.compression_ratio, lclm.config.pooling,
                                   prompt_profile=PROMPT_PROFILE)

    @property
    def any_lclm(self) -> LCLM:
        return next(iter(self.lclms.values()))

    @property
    def decoder(self) -> nn.Module:
        return self.any_lclm.decoder

    @property
    def device(self) -> torch.device:
        return self.any_lclm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.any_lclm.dtype

    @property
    def window(self) -> int:
        return self.any_lclm.config.encoder_window_size

    @property
    def max_positions(self) -> int | None:
        return self.any_lclm.max_positions

    @property
    def encoder_shape(self) -> Shape:
        return Shape.from_config(self.any_lclm.encoder.model.config)

    @property
    def decoder_shape(self) -> Shape:
        return Shape.from_config(self.decoder.config)

    def weights_bytes(self) -> int:
        """Bytes of all parameters (encoder, decoder, every adapter), each tensor counted once."""
        seen, total = set(), 0
        for lclm in self.lclms.values():
            for param in lclm.parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    total += param.numel() * param.element_size()
        return total

    def document(self, tokens: int, seed: int) -> list[int]:
        """A random document of `tokens` ids that both tokenizers know."""
        generator = torch.Generator().manual_seed(seed)
        picks = torch.randint(len(self.doc_vocab), (tokens,), generator=generator)
        return self.doc_vocab[picks].tolist()

    def describe(self) -> dict:
        enc, dec = self.encoder_shape, self.decoder_shape
        return {
            "name": self.name,
            "encoder": dataclasses.asdict(enc),
            "decoder": dataclasses.asdict(dec),
            "window": self.window,
            "ratios": sorted(self.lclms),
            "pooling": self.any_lclm.config.pooling,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "weights_bytes": self.weights_bytes(),
            "attention": getattr(self.decoder.config, "_attn_implementation", None),
            "encoder_batch_tokens": self.any_lclm.encoder.batch_tokens(),
            "max_positions": self.max_positions,
            "prompt_tokens": len(self.before) + len(self.after),
            "notes": self.notes,
        }


# ---- shared pieces ------------------------------------------------------------------------
def rig_studio(lclms: dict[int, LCLM]) -> Studio:
    """A studio whose model pool holds the rig's LCLMs, with its caches sized for any document
    (the latent cache in a temporary directory)."""
    base = next(iter(lclms.values()))
    settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="lclm-speed-")), device=str(base.device),
                        dtype=str(base.dtype).removeprefix("torch."), max_document_tokens=2**31 - 1,
                        kv_cache_mb=2**40 // 2**20, cache_size_mb=2**20, stop_at_repeat=False)
    studio = Studio(settings, checkpoint=RIG_CHECKPOINT)
    for lclm in lclms.values():
        studio.models.add(RIG_CHECKPOINT, lclm)
    return studio


def document_vocab(lclm: LCLM, size: int) -> torch.Tensor:
    """Ids below `size` that are special in neither tokenizer: [V]."""
    special = set()
    for tokenizer in (lclm.encoder_tokenizer, lclm.decoder_tokenizer):
        special |= set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return torch.tensor([i for i in range(size) if i not in special], dtype=torch.long)


def with_ratio(base: LCLM, ratio: int) -> LCLM:
    """The same encoder, decoder (and adapter where its width fits) at another compression ratio."""
    if ratio == base.config.compression_ratio:
        return base
    config = dataclasses.replace(base.config, compression_ratio=ratio)
    width = make_pooling(config.pooling, ratio).latent_dim(base.encoder.hidden_size)
    adapter = base.adapter if width == base.encoder.latent_dim else None  # None: a fresh adapter
    lclm = LCLM(config, base.encoder.model, base.encoder_tokenizer, base.decoder, base.decoder_tokenizer,
                adapter=adapter, checkpoint_id=f"{base.checkpoint_id}@1:{ratio}")
    lclm.encoder.max_batch_tokens = base.encoder.max_batch_tokens
    return lclm.to(device=base.device, dtype=base.dtype).eval()


def embedding_rows(base: LCLM) -> int:
    return min(base.encoder.model.get_input_embeddings().weight.shape[0],
               base.decoder.get_input_embeddings().weight.shape[0])


def finish_rig(name: str, base: LCLM, ratios: list[int], vocab_size: int, notes: list[str]) -> Rig:
    lclms = {ratio: with_ratio(base, ratio) for ratio in ratios}
    before, after = prompt_parts(base, PROMPT_PROFILES[PROMPT_PROFILE], QUESTION)
    return Rig(name=name, lclms=lclms, before=before, after=after, doc_vocab=document_vocab(base, vocab_size),
               studio=rig_studio(lclms), notes=notes)


# ---- a real checkpoint (the embedded default) --------------------------------------------------
def checkpoint_rig(spec: str | None, ratios: list[int], device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> Rig:
    """The app's own loader: the embedded default (spec None) or a checkpoint directory."""
    from model.loading import load_lclm

    base = load_lclm(spec, device=device, dtype=dtype)
    name = base.checkpoint_id.removesuffix(":untrained")
    notes = [] if base.config.trained else ["untrained adapter (speed does not depend on the weights)"]
    return finish_rig(name, base, ratios, min(len(base.encoder_tokenizer), embedding_rows(base)), notes)


# ---- random weights shaped like the paper's pair ----------------------------------------------
@dataclass(frozen=True)
class PairShape:
    """Qwen3 config keyword arguments of an encoder (base model) and a decoder (causal LM)."""

    encoder: dict
    decoder: dict
    window: int


QWEN3_EMBEDDING_0_6B = dict(  # Qwen/Qwen3-Embedding-0.6B config.json
    vocab_size=151669, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, tie_word_embeddings=True,
)
QWEN3_4B_INSTRUCT_2507 = dict(  # Qwen/Qwen3-4B-Instruct-2507 config.json
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0}, tie_word_embeddings=True,
)
TINY_ENCODER = dict(
    vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=4096, tie_word_embeddings=True,
)
TINY_DECODER = dict(
    vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True,
)
PAIRS: dict[str, PairShape] = {
    "paper": PairShape(encoder=QWEN3_EMBEDDING_0_6B, decoder=QWEN3_4B_INSTRUCT_2507, window=1024),
    "tiny": PairShape(encoder=TINY_ENCODER, decoder=TINY_DECODER, window=32),
}


def minimal_tokenizer():
    """A word-level tokenizer with the chat and memory tokens; every other word is unknown.
    Enough for the chat template, the memory placeholders and KVzip's replay prompt."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *MEMORY_TOKENS]
    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", chat_template=CHATML_TEMPLATE)
    tokenizer.add_tokens(specials, special_tokens=True)
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    return tokenizer


def random_model(kind: str, kwargs: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A Qwen3 model with random weights, initialised directly on `device` in `dtype` (no fp32 copy)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(**kwargs)
    cls = Qwen3ForCausalLM if kind == "decoder" else Qwen3Model
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def random_pair_rig(pair: str, ratios: list[int], device: str | torch.device, dtype: torch.dtype | None = None,
                    pooling: str = "mean", seed: int = 0) -> Rig:
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shape = PAIRS[pair]
    tokenizer = minimal_tokenizer()
    # KVzip loads the decoder's tokenizer from config.name_or_path: give it a directory to read.
    tokenizer_dir = tempfile.mkdtemp(prefix="lclm-speed-tokenizer-")
    tokenizer.save_pretrained(tokenizer_dir)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        decoder = random_model("decoder", shape.decoder, device, dtype)
        encoder = random_model("encoder", shape.encoder, device, dtype)
    decoder.config.name_or_path = tokenizer_dir
    decoder.generation_config.eos_token_id = tokenizer.eos_token_id
    config = LCLMConfig(compression_ratio=max(ratios), encoder_window_size=shape.window, pooling=pooling,
                        encoder_mask_type="causal", adapter_type="mlp", trained=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the adapter
        base = LCLM(config, encoder, tokenizer, decoder, tokenizer, checkpoint_id=f"random-{pair}")
    base = base.to(device=device, dtype=dtype).eval()
    name = {"paper": "random weights shaped like Qwen3-Embedding-0.6B + Qwen3-4B-Instruct-2507",
            "tiny": "tiny random Qwen3 pair"}[pair]
    notes = ["random weights (speed does not depend on the weights)", "documents are random token ids"]
    return finish_rig(name, base, ratios, embedding_rows(base), notes)
