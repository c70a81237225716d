"""Training on tiny random models: example builders and their exact loss masks, stage
freezing, checkpoints that model.loading reads, resume after an interruption, and the smoke
run (the CI test of the whole pipeline)."""

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model.chunking import chunk_text
from model.config import LCLMConfig
from model.loading import load_lclm
from model.prompts import MEMORY, MEMORY_END, MEMORY_START, memory_region, reconstruction_prompt
from model.training.config import (
    InterleavedSettings,
    LoraSettings,
    ReconstructionSettings,
    RunConfig,
    StageConfig,
    TaskSettings,
)
from model.training.data.prepare import prepare
from model.training.data.shards import pack
from model.training.examples import IGNORE, OBJECTIVES, ExampleBuilder, collate
from model.training.modeling import LCLMForTraining, build_trainable, lora_flags
from model.training.stages import STAGES, apply_stage
from model.training.trainer import Trainer
from tests.tiny_models import CORPUS, TextSource, corpus_rotations

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lclm(tiny_lclm_factory):
    return tiny_lclm_factory(family="qwen3", ratio=4, pooling="mean", window=16)


@pytest.fixture(scope="module")
def builder(lclm):
    return ExampleBuilder(lclm)


def ids_of(tokenizer, *tokens):
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


# ---- example builders and loss masks ---------------------------------------------------------
def test_interleaved_masks_exactly_the_memory_regions_and_their_tags(lclm, builder):
    raw = lclm.decoder_tokenizer(CORPUS, add_special_tokens=False)["input_ids"][:40]
    spans = [("text", 5), ("memory", 20), ("text", 7), ("memory", 6), ("text", 2)]
    sample = builder.interleaved(raw, spans)
    ms, m, me = ids_of(lclm.decoder_tokenizer, MEMORY_START, MEMORY, MEMORY_END)
    # the two tiny tokenizers differ: memory spans are re-tokenized for the encoder
    assert not builder.shared_vocab
    first = builder.to_encoder(raw[5:25])
    second = builder.to_encoder(raw[32:38])
    assert first == lclm.encoder_tokenizer(lclm.decoder_tokenizer.decode(raw[5:25]),
                                           add_special_tokens=False)["input_ids"]
    k1, k2 = lclm.count_latents(len(first)), lclm.count_latents(len(second))
    expected_ids = (raw[0:5] + [ms] + [m] * k1 + [me] + raw[25:32] + [ms] + [m] * k2 + [me] + raw[38:40])
    expected_labels = (raw[0:5] + [IGNORE] * (k1 + 2) + raw[25:32] + [IGNORE] * (k2 + 2) + raw[38:40])
    assert sample.input_ids == expected_ids
    assert sample.labels == expected_labels
    assert sample.documents == [first, second]
    assert sample.regions == [(0, 0, k1), (1, 0, k2)]
    # masked positions: exactly the placeholders and the two tags of each region
    masked = [i for i, label in enumerate(sample.labels) if label == IGNORE]
    assert masked == list(range(5, 5 + k1 + 2)) + list(range(12 + k1 + 2, 12 + k1 + 2 + k2 + 2))


def test_reconstruction_example(lclm, builder):
    raw = lclm.decoder_tokenizer("The vault code is 5521. Alpha beta gamma delta.",
                                 add_special_tokens=False)["input_ids"]
    sample = builder.reconstruction(raw)
    k = lclm.count_latents(len(builder.to_encoder(raw)))
    prompt = lclm.decoder_tokenizer(lclm.chat(reconstruction_prompt(memory_region(k))),
                                    add_special_tokens=False)["input_ids"]
    end = lclm.decoder_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sample.input_ids == prompt + raw + [end]
    assert sample.labels == [IGNORE] * len(prompt) + raw + [end]
    assert sample.input_ids.count(lclm.memory_token_id) == k
    assert sample.regions == [(0, 0, k)]


def test_task_and_expand_rounds_match_the_inference_prompts(lclm, builder):
    context = " ".join(CORPUS.split()[:120])
    sample = builder.task(context, "What is the vault code?", "5521")
    assert sample.input_ids.count(lclm.memory_token_id) == sample.regions[0][2]
    reply = [t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE]
    assert lclm.decoder_tokenizer.decode(reply[:-1]) == "5521"
    offset = context.index("5521")
    rounds = builder.expand_rounds(context, "What is the vault code?", [offset], "5521", chunk_tokens=16)
    assert len(rounds) == 2
    chunks = chunk_text(context, lclm.decoder_tokenizer, 16)
    for sample in rounds:  # each chunk's text encoded on its own, one region per chunk, as in inference
        assert sample.documents == [lclm.encoder_tokenizer(c.text, add_special_tokens=False)["input_ids"]
                                    for c in chunks]
        assert sample.regions == [(i, 0, lclm.count_latents(len(d))) for i, d in enumerate(sample.documents)]
    needed = next(c.number for c in chunks if c.start_char <= offset < c.end_char)
    first = lclm.decoder_tokenizer.decode([t for t, label in zip(rounds[0].input_ids, rounds[0].labels)
                                           if label != IGNORE])
    second = lclm.decoder_tokenizer.decode([t for t, label in zip(rounds[1].input_ids, rounds[1].labels)
                                            if label != IGNORE])
    assert first.startswith(f"EXPAND: {needed}") and second.startswith("ANSWER: 5521")
    assert f"### Chunk {needed}\n" in lclm.decoder_tokenizer.decode(rounds[1].input_ids)


def test_collate_pads_and_keeps_regions_in_placeholder_order(lclm, builder):
    raw = lclm.decoder_tokenizer(CORPUS, add_special_tokens=False)["input_ids"]
    a = builder.interleaved(raw[:30], [("memory", 10), ("text", 20)])
    b = builder.interleaved(raw[30:50], [("text", 4), ("memory", 8), ("text", 8)])
    batch = collate([a, b], pad_id=0)
    assert batch.input_ids.shape == (2, max(len(a.input_ids), len(b.input_ids)))
    assert batch.regions == [(0, 0, a.regions[0][2]), (1, 0, b.regions[0][2])]
    assert int(batch.attention_mask[1].sum()) == len(b.input_ids)
    assert (batch.labels[1, len(b.input_ids):] == IGNORE).all()


# ---- tiny runs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_corpus(lclm, tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    prepare([TextSource(corpus_rotations(4))], lclm.decoder_tokenizer, root / "shards", max_tokens_per_source=20_000,
            validation_permille=200, quiet=True)
    pack(root / "shards", root / "corpus.safetensors.xz")
    return root / "corpus.safetensors.xz"


def tiny_run(checkpoint: Path, corpus: Path, weights: str = "lora", stages=(0, 1, 2, 3), steps: int = 2,
             save_every: int = 1) -> RunConfig:
    lr = {"adapter": 1e-2, "encoder": 1e-2, "decoder": 1e-2}
    return RunConfig(
        encoder=str(checkpoint / "encoder"), decoder=str(checkpoint / "decoder"), encoder_short="t1",
        decoder_short="t2", lclm=LCLMConfig(compression_ratio=4, encoder_window_size=16), corpus=str(corpus),
        encoder_weights=weights, decoder_weights=weights,
        lora=LoraSettings(r=2, alpha=4, target_modules=["q_proj", "v_proj"]),
        interleaved=InterleavedSettings(seq_tokens=48, span_tokens=(4, 16)),
        reconstruction=ReconstructionSettings(span_tokens=(4, 16)),
        task=TaskSettings(context_tokens=(32, 64), chunk_tokens=8),
        stages=[StageConfig(stage=s, steps=steps, batch_size=2, lr=lr, objectives=STAGES[s].default_objectives)
                for s in stages],
        save_every=save_every, keep_checkpoints=1, eval_batches=1, log_every=1,
    )


@pytest.fixture(scope="module")
def pair(tiny_checkpoint, tiny_corpus):
    """The tiny LoRA pair and corpus as one stage-0 run, for the campaign's and the runbook's tests."""
    return tiny_run(tiny_checkpoint, tiny_corpus, "lora", stages=(0,))


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["lora", "full"])
def test_each_stage_trains_exactly_its_parameter_groups(weights, tiny_checkpoint, tiny_corpus):
    run = tiny_run(tiny_checkpoint, tiny_corpus, weights)
    model = build_trainable(run)
    builder = ExampleBuilder(model)
    raw = model.decoder_tokenizer(CORPUS, add_special_tokens=False)["input_ids"][:40]
    batch = collate([builder.interleaved(raw, [("memory", 16), ("text", 24)])], pad_id=0)
    forward = LCLMForTraining(model)
    for stage in STAGES:
        model.zero_grad(set_to_none=True)
        trained = apply_stage(model, stage, lora_flags(run))
        forward(batch.input_ids, batch.attention_mask, batch.labels, batch.documents, batch.regions).backward()
        with_grad = {group for group, module in (("adapter", model.adapter), ("encoder", model.encoder.model),
                                                 ("decoder", model.decoder))
                     if any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())}
        assert with_grad == set(STAGES[stage].trains), (stage, with_grad)
        assert set(trained) == set(STAGES[stage].trains)
        for name, p in model.named_parameters():
            if weights == "lora" and p.grad is not None and "adapter." not in name.split("lclm.")[-1][:8]:
                assert "lora_" in name or "trainable_tokens" in name or name.startswith("adapter."), name


@pytest.mark.slow
def test_lora_checkpoint_loads_with_the_same_outputs_and_memory_rows(tiny_checkpoint, tiny_corpus, tmp_path):
    run = tiny_run(tiny_checkpoint, tiny_corpus, "lora", stages=(0, 2), steps=2)
    assert Trainer(run, tmp_path / "run", quiet=True).train() == "done"
    final = tmp_path / "run" / "final"
    config = json.loads((final / "decoder" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == run.decoder
    saved = load_file(final / "decoder" / "adapter_model.safetensors")
    rows = [k for k in saved if "trainable_tokens" in k]
    assert len(rows) == 1 and saved[rows[0]].shape[0] == 3  # the three memory tokens' rows, nothing else
    assert not any("embed_tokens.weight" in k for k in saved)
    trained = build_trainable(run, sorted((tmp_path / "run" / "stage2-end-to-end").glob("checkpoint_*"))[-1]).eval()
    loaded = load_lclm(str(final), device="cpu")
    ids = loaded.tokenize_document(CORPUS[:300]).ids
    with torch.no_grad():
        assert torch.allclose(trained.encode(ids), loaded.compress(ids), atol=1e-5)
        x = torch.tensor([loaded.decoder_tokenizer(CORPUS[:200])["input_ids"]])
        assert torch.allclose(trained.decoder(input_ids=x).logits, loaded.decoder(input_ids=x).logits, atol=1e-4)
        memory = ids_of(loaded.decoder_tokenizer, MEMORY_START, MEMORY, MEMORY_END)
        new_rows = trained.decoder.get_input_embeddings()(torch.tensor(memory))
        assert torch.allclose(new_rows, loaded.decoder.get_input_embeddings().weight[memory], atol=1e-6)
    assert loaded.config.trained is True
    log = [json.loads(line)
           for line in (tmp_path / "run" / "stage0-adapter-warmup" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and log[-1]["tokens_per_s"] > 0


@pytest.mark.slow
def test_full_weights_checkpoint_loads(tiny_checkpoint, tiny_corpus, tmp_path):
    run = tiny_run(tiny_checkpoint, tiny_corpus, "full", stages=(0,), steps=1)
    assert Trainer(run, tmp_path / "run", quiet=True).train() == "done"
    final = tmp_path / "run" / "final"
    assert ((final / "decoder" / "model.safetensors").is_file()
            and not (final / "decoder" / "adapter_config.json").exists())
    assert load_lclm(str(final), device="cpu").config.trained is True


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_weights(tiny_checkpoint, tiny_corpus, tmp_path, monkeypatch):
    run = tiny_run(tiny_checkpoint, tiny_corpus, "lora", stages=(0, 1), steps=3)
    assert Trainer(run, tmp_path / "straight", quiet=True).train() == "done"

    original = Trainer.draw

    def draw_then_interrupt(self, builder, stage, step, micro, rank, split):
        if split == "train" and stage.stage == 1 and step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # handled: the step finishes, a checkpoint is saved
        return original(self, builder, stage, step, micro, rank, split)

    monkeypatch.setattr(Trainer, "draw", draw_then_interrupt)
    assert Trainer(run, tmp_path / "resumed", quiet=True).train() == "interrupted"
    stage_dir = tmp_path / "resumed" / "stage1-encoder"
    assert [p.name for p in stage_dir.glob("checkpoint_*")] == ["checkpoint_2"]
    assert not (stage_dir / "done.json").exists()
    assert (stage_dir / "checkpoint_2" / "optimizer-rank0.safetensors").is_file()
    monkeypatch.setattr(Trainer, "draw", original)
    assert Trainer(run, tmp_path / "resumed", quiet=True).train() == "done"
    for part in ("adapter/adapter.safetensors", "encoder/adapter_model.safetensors"):
        a, b = load_file(tmp_path / "straight" / "final" / part), load_file(tmp_path / "resumed" / "final" / part)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-6), (part, key)


def test_objectives_draw_samples_that_fit(tiny_checkpoint, tiny_corpus, tmp_path):
    run = tiny_run(tiny_checkpoint, tiny_corpus)
    trainer = Trainer(run, tmp_path, quiet=True)
    model = build_trainable(run)
    builder = ExampleBuilder(model)
    for stage in run.stages:
        for step in range(3):
            objective, samples = trainer.draw(builder, stage, step, 0, 0, "train")
            assert objective in stage.objectives and len(samples) == stage.batch_size
            for s in samples:
                assert s.input_ids.count(model.memory_token_id) == sum(b - a for _, a, b in s.regions)
                assert any(label != IGNORE for label in s.labels)
    assert set(OBJECTIVES) == {"interleaved", "reconstruction", "task"}


def test_stage_config_validation():
    with pytest.raises(ValueError, match="positive lr"):
        StageConfig(stage=1, steps=1, lr={"adapter": 1e-3}, objectives={"interleaved": 1.0})
    with pytest.raises(ValueError, match="objectives"):
        StageConfig(stage=0, steps=1, lr={"adapter": 1e-3}, objectives={"nope": 1.0})
    with pytest.raises(ValueError, match="stage must be"):
        StageConfig(stage=7, steps=1, lr={}, objectives={"interleaved": 1.0})


@pytest.mark.slow
def test_smoke_run_writes_a_loadable_checkpoint(tmp_path):
    """The CI test: all four stages on a tiny random model and corpus, on CPU."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "model.training", "--smoke", "--quiet", "--out",
                          str(tmp_path / "smoke")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "smoke" / "smoke.json").read_text())
    assert summary["latents"][0] > 0
    for stage in ("stage0-adapter-warmup", "stage1-encoder", "stage2-end-to-end", "stage3-sft"):
        done = json.loads((tmp_path / "smoke" / stage / "done.json").read_text())
        assert all(np.isfinite(v) for v in done["validation_loss"].values())
    assert "task" in json.loads((tmp_path / "smoke" / "stage3-sft" / "done.json").read_text())["validation_loss"]
    assert load_lclm(str(tmp_path / "smoke" / "final"), device="cpu").config.trained


@pytest.mark.embedded
def test_embedded_lora_checkpoint_loads_through_the_local_base(tmp_path):
    """A LoRA run on the embedded SmolLM2 names HuggingFaceTB/SmolLM2-135M-Instruct as its base,
    and load_lclm finds that base locally (converted from the GGUF)."""
    from model.embedded import BASE_NAME, ensure_base

    corpus_root = tmp_path / "corpus"
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(ensure_base() / "decoder")
    prepare([TextSource(corpus_rotations(4))], tokenizer, corpus_root, max_tokens_per_source=20_000,
            validation_permille=200, quiet=True)
    run = RunConfig.load("smollm2-l6-smollm2-135m-cs16-mean-w1024-causal-mlp")
    run = replace(run, corpus=str(corpus_root), interleaved=InterleavedSettings(seq_tokens=96, span_tokens=(32, 64)),
                  reconstruction=ReconstructionSettings(span_tokens=(16, 32)), eval_batches=0,
                  stages=[replace(s, steps=1, batch_size=1, warmup_steps=0) for s in run.stages if s.stage in (0, 2)])
    assert Trainer(run, tmp_path / "run", quiet=True).train() == "done"
    final = tmp_path / "run" / "final"
    assert json.loads((final / "decoder" / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE_NAME
    size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
    assert size < 40 * 2**20  # LoRA + adapter + tokenizer + memory rows in bfloat16
    loaded = load_lclm(str(final), device="cpu")
    assert loaded.config.trained and loaded.compress(loaded.tokenize_document(CORPUS).ids).shape[1] == 576
