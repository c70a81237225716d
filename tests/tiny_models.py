"""Tiny random LCLMs written in the published checkpoint layout, built offline from config
objects (no model hub, no network).

    <dir>/model_config.json
    <dir>/decoder/   Qwen3ForCausalLM or LlamaForCausalLM (+ tokenizer with the memory tokens)
    <dir>/encoder/   Qwen3Model or LlamaModel (+ its own, different, tokenizer)
    <dir>/adapter/adapter.safetensors

With `lora=True`, decoder/ and encoder/ are PEFT LoRA adapters whose
`base_model_name_or_path` is a full tiny base model written next to the checkpoint
(`<dir>-base/{decoder,encoder}`). The base weights and the MLP adapter are the same as
those of the non-LoRA checkpoint with the same settings, so the two differ only by the LoRA.

The tiny text they learn from: CORPUS, a tokenizer trained on it, and TextSource, a training
corpus source of given texts (corpus_rotations: documents made of CORPUS's lines).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from model.checkpoint import add_memory_tokens, quiet_transformers
from model.config import LCLMConfig
from model.lclm import LCLM
from model.loading import save_lclm
from model.prompts import CHATML_TEMPLATE
from model.training.data.corpus import CorpusDocument, Source

SEED = 1234
ATTN = "sdpa"
ENCODER_HIDDEN = 24
DECODER_HIDDEN = 48
ENCODER_VOCAB = 300  # the two tokenizers differ, so tests can tell whose ids a text got
DECODER_VOCAB = 360
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]  # pad (<|endoftext|>) is not id 0

CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Alpha beta gamma delta. The vault code is 5521. The grass is green and the sky is blue.
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness.
All happy families are alike; each unhappy family is unhappy in its own way.
Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse,
and nothing particular to interest me on shore, I thought I would sail about a little and see the watery part
of the world. In the beginning the universe was created. This has made a lot of people very angry and been
widely regarded as a bad move. The special magic number is 7294. Here we go, there and back again.
Question: what is the answer? Answer the question using the document. Repeat the text above exactly.
The model reads the document in windows, pools every group of tokens into one latent, and the decoder
reads the latents in place of the text. Memory, context, compression, encoder, decoder, adapter.
"""


def train_tokenizer(vocab_size: int):
    """A deterministic byte-level BPE tokenizer trained on CORPUS, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS.splitlines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


class TextSource(Source):
    """A training corpus source of the given texts, as documents doc0, doc1, ..."""

    def __init__(self, docs: list[str]):
        self.name, self.licence, self.docs = "test-text", "test", docs

    def documents(self):
        for i, text in enumerate(self.docs):
            yield CorpusDocument(self.name, f"doc{i}", text)


def corpus_rotations(copies: int) -> list[str]:
    """Every rotation of CORPUS's lines (each line first in one of them), `copies` times over."""
    lines = CORPUS.splitlines()
    return ["\n".join(lines[i:] + lines[:i]) for i in range(len(lines))] * copies


def model_config(family: str, hidden: int, vocab_size: int, tokenizer, head_dim: int = 16):
    from transformers import LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=4096,
        initializer_range=0.3,  # well above the default 0.02, so that greedy output varies instead of repeating a token
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    if family == "qwen3":
        config = Qwen3Config(tie_word_embeddings=True, **common)
    elif family == "llama":
        config = LlamaConfig(tie_word_embeddings=False, **common)
    else:
        raise ValueError(f"unknown family {family!r}")
    config._attn_implementation = ATTN
    return config


def build_tiny_lclm(family: str = "qwen3", ratio: int = 4, pooling: str = "mean", mask: str = "causal",
                    window: int = 16, decoder_head_dim: int = 16) -> LCLM:
    """A tiny random LCLM in memory; the same arguments always give the same weights.
    `decoder_head_dim`: 32 or more for a decoder that vLLM's CPU attention serves."""
    from transformers import LlamaForCausalLM, LlamaModel, Qwen3ForCausalLM, Qwen3Model

    config = LCLMConfig(compression_ratio=ratio, encoder_window_size=window, pooling=pooling,
                        encoder_mask_type=mask, adapter_type="mlp")
    decoder_cls, encoder_cls = {"qwen3": (Qwen3ForCausalLM, Qwen3Model),
                                "llama": (LlamaForCausalLM, LlamaModel)}[family]
    encoder_tokenizer = train_tokenizer(ENCODER_VOCAB)
    decoder_tokenizer = train_tokenizer(DECODER_VOCAB)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        decoder = decoder_cls(model_config(family, DECODER_HIDDEN, len(decoder_tokenizer), decoder_tokenizer,
                                           head_dim=decoder_head_dim))
        decoder.generation_config.eos_token_id = decoder_tokenizer.eos_token_id
        decoder.generation_config.pad_token_id = decoder_tokenizer.pad_token_id
        add_memory_tokens(decoder_tokenizer, decoder)
        encoder = encoder_cls(model_config(family, ENCODER_HIDDEN, len(encoder_tokenizer), encoder_tokenizer))
        lclm = LCLM(config, encoder, encoder_tokenizer, decoder, decoder_tokenizer)
    return lclm.eval()


def _add_lora(model, seed: int):
    """`model` wrapped in a LoRA on all attention projections, with non-zero random lora_B."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = get_peft_model(model, lora)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    return peft_model


def _write_lora(model, base_dir: Path, target: Path, seed: int, tokenizer=None) -> None:
    peft_model = _add_lora(model, seed)
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir.resolve())
    peft_model.save_pretrained(target)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    config = json.loads((target / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    assert (target / "adapter_model.safetensors").is_file()


def write_tiny_checkpoint(directory, family: str = "qwen3", ratio: int = 4, pooling: str = "mean",
                          mask: str = "causal", window: int = 16, lora: bool = False,
                          decoder_head_dim: int = 16) -> Path:
    """Write a tiny random LCLM to `directory` in the published layout; returns the directory."""
    directory = Path(directory)
    with quiet_transformers():
        lclm = build_tiny_lclm(family=family, ratio=ratio, pooling=pooling, mask=mask, window=window,
                               decoder_head_dim=decoder_head_dim)
        save_lclm(lclm, directory)
        if lora:
            _write_lora_components(lclm, directory)
    return directory


def _write_lora_components(lclm: LCLM, directory: Path) -> None:
    """Move the full decoder/ and encoder/ to `<dir>-base/` and write LoRAs on them in their place."""
    base = directory.with_name(directory.name + "-base")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    for kind in ("decoder", "encoder"):
        shutil.move(str(directory / kind), str(base / kind))
    # the decoder LoRA carries its tokenizer; the encoder LoRA has none, so the loader falls back to its base's
    _write_lora(lclm.decoder, base / "decoder", directory / "decoder", SEED + 1, lclm.decoder_tokenizer)
    _write_lora(lclm.encoder.model, base / "encoder", directory / "encoder", SEED + 2)
