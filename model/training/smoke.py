"""The smoke run: all four stages on a tiny random model and a tiny corpus, on CPU, in about
a minute (`python -m model.training --smoke --out DIR`); the CI test of the pipeline.

Everything is made here, offline and deterministically: a byte-level BPE tokenizer trained
on the corpus text, a 2-layer Llama decoder whose first layer is the encoder (as in the
embedded default), a corpus from Python standard-library sources, and a run config.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.config import LCLMConfig
from model.prompts import CHATML_TEMPLATE
from model.training.config import (
    InterleavedSettings,
    LoraSettings,
    ReconstructionSettings,
    RunConfig,
    StageConfig,
    TaskSettings,
)
from model.training.data.corpus import PythonPackagesSource, clean

SMOKE_PACKAGES = ["json", "email"]
SMOKE_TOKENS = 60_000


def tiny_tokenizer(text: str, vocab_size: int = 512):
    """A byte-level BPE tokenizer with the chat tokens, trained on `text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=CHATML_TEMPLATE,
                                   model_max_length=4096)


def tiny_bases(directory: Path, tokenizer, seed: int = 0) -> tuple[Path, Path]:
    """A tiny random Llama decoder (2 layers, hidden 64) and its first layer as the encoder."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    decoder = LlamaForCausalLM(config)
    encoder_config = LlamaConfig.from_dict({**config.to_dict(), "num_hidden_layers": 1})
    encoder = LlamaModel(encoder_config)
    encoder.load_state_dict({k.removeprefix("model."): v for k, v in decoder.state_dict().items()
                             if k.startswith("model.")}, strict=False)
    paths = directory / "decoder", directory / "encoder"
    for model, path in zip((decoder, encoder), paths):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return paths


def smoke_config(decoder: Path, encoder: Path, corpus: Path) -> RunConfig:
    """LoRA on both components, 1:4 mean pooling, windows of 32 tokens, a few steps per stage."""
    lr = {"adapter": 3e-3, "encoder": 1e-3, "decoder": 1e-3}
    stage = dict(steps=3, batch_size=2, lr=lr, warmup_steps=1)
    return RunConfig(
        encoder=str(encoder), decoder=str(decoder), encoder_short="tiny1l", decoder_short="tiny2l",
        lclm=LCLMConfig(compression_ratio=4, encoder_window_size=32, pooling="mean"),
        corpus=str(corpus),
        lora=LoraSettings(r=4, alpha=8),
        interleaved=InterleavedSettings(seq_tokens=96, memory_fraction=0.5, span_tokens=(8, 40)),
        reconstruction=ReconstructionSettings(span_tokens=(8, 40)),
        task=TaskSettings(context_tokens=(48, 96), expand_share=0.5, chunk_tokens=16),
        stages=[
            StageConfig(stage=0, objectives={"interleaved": 1.0, "reconstruction": 1.0}, **stage),
            StageConfig(stage=1, objectives={"interleaved": 1.0, "reconstruction": 1.0}, **stage),
            StageConfig(stage=2, objectives={"interleaved": 1.0, "reconstruction": 0.5}, **stage),
            StageConfig(stage=3, objectives={"task": 1.0, "interleaved": 0.25, "reconstruction": 0.25}, **stage),
        ],
        save_every=2, keep_checkpoints=1, log_every=1, eval_batches=1,
    )


def prepare_smoke(out: Path) -> RunConfig:
    """Tokenizer, tiny bases and corpus under `out/smoke-data`; returns the smoke run config."""
    from model.training.data.prepare import prepare
    from model.training.data.shards import pack

    data = out / "smoke-data"
    source = PythonPackagesSource("python-source", SMOKE_PACKAGES)
    text, size = [], 0
    for doc in source.documents():
        text.append(clean(doc.text, []))
        size += len(text[-1])
        if size > 4 * SMOKE_TOKENS:
            break
    tokenizer = tiny_tokenizer("\n\n".join(text))
    decoder, encoder = tiny_bases(data / "bases", tokenizer)
    prepare([source], tokenizer, data / "corpus", tokenizer_name="smoke", max_tokens_per_source=SMOKE_TOKENS,
            validation_permille=100, quiet=True)
    packed = data / "corpus.safetensors.xz"
    pack(data / "corpus", packed)
    return smoke_config(decoder, encoder, packed)


def smoke_run(out: Path) -> RunConfig:
    """The smoke run config, its data prepared under `out/smoke-data` on first use."""
    data = out / "smoke-data"
    if (data / "corpus.safetensors.xz").is_file():
        return smoke_config(data / "bases" / "decoder", data / "bases" / "encoder", data / "corpus.safetensors.xz")
    return prepare_smoke(out)
