"""The run configs in model/training/configs: every run name there loads, with the settings each
name has always had (the values below are those of the one-file-per-run configs the SmolLM2
family file replaced), and family files expand into their variants."""

import pytest

from model.training.config import CONFIG_DIR, RunConfig, run_names

STAGE_DEFAULTS = {"grad_accum": 1, "weight_decay": 0.0, "max_grad_norm": 1.0}
TASKS = {"niah_single": 1.0, "niah_multikey": 1.0, "niah_multivalue": 1.0, "variable_tracking": 1.0,
         "kv_retrieval": 1.0, "sentence_qa": 1.0}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}

SMOLLM2 = {  # smollm2-l6-smollm2-135m-cs4-mean-w1024-causal-mlp
    "encoder": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "decoder": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "encoder_short": "smollm2-l6",
    "decoder_short": "smollm2-135m",
    "lclm": {"compression_ratio": 4, "encoder_window_size": 1024, "pooling": "mean", "encoder_mask_type": "causal",
             "boundary_overlap": 0, "adapter_type": "mlp", "trained": True},
    "stages": [
        {"stage": 0, "steps": 300, "lr": {"adapter": 0.001}, "objectives": {"interleaved": 1.0, "reconstruction": 1.0},
         "batch_size": 16, "warmup_steps": 30, **STAGE_DEFAULTS},
        {"stage": 1, "steps": 300, "lr": {"adapter": 0.0005, "encoder": 0.0002},
         "objectives": {"interleaved": 1.0, "reconstruction": 1.0}, "batch_size": 16, "warmup_steps": 30,
         **STAGE_DEFAULTS},
        {"stage": 2, "steps": 600, "lr": {"adapter": 0.0002, "encoder": 0.0001, "decoder": 5e-05},
         "objectives": {"interleaved": 1.0, "reconstruction": 0.5}, "batch_size": 16, "warmup_steps": 30,
         **STAGE_DEFAULTS},
        {"stage": 3, "steps": 300, "lr": {"adapter": 0.0001, "encoder": 5e-05, "decoder": 5e-05},
         "objectives": {"task": 1.0, "interleaved": 0.25, "reconstruction": 0.25}, "batch_size": 16,
         "warmup_steps": 30, **STAGE_DEFAULTS},
    ],
    "corpus": "data/corpus.safetensors.xz",
    "encoder_weights": "lora",
    "decoder_weights": "lora",
    "lora": LORA,
    "decoder_lora": None,
    "interleaved": {"seq_tokens": 2048, "memory_fraction": 0.5, "span_tokens": (128, 1024)},
    "reconstruction": {"span_tokens": (32, 512)},
    "task": {"context_tokens": (256, 4096), "tasks": TASKS, "expand_share": 0.25, "chunk_tokens": 512},
    "precision": "auto",
    "gradient_checkpointing": True,
    "save_every": 200,
    "keep_checkpoints": 2,
    "log_every": 10,
    "eval_batches": 8,
    "save_dtype": "bfloat16",
    "seed": 0,
    "publish_to": "model/weights/smollm2-135m-cs4-mean-w1024-causal-mlp",
}
# Where each SmolLM2 run differs from the one above: (compression_ratio, pooling, publish_to).
SMOLLM2_VARIANTS = {
    "smollm2-l6-smollm2-135m-cs4-mean-w1024-causal-mlp":
        (4, "mean", "model/weights/smollm2-135m-cs4-mean-w1024-causal-mlp"),
    "smollm2-l6-smollm2-135m-cs4-concat-w1024-causal-mlp":
        (4, "concat", "model/weights/smollm2-135m-cs4-concat-w1024-causal-mlp"),
    "smollm2-l6-smollm2-135m-cs8-mean-w1024-causal-mlp":
        (8, "mean", "model/weights/smollm2-135m-cs8-mean-w1024-causal-mlp"),
    "smollm2-l6-smollm2-135m-cs8-concat-w1024-causal-mlp":
        (8, "concat", "model/weights/smollm2-135m-cs8-concat-w1024-causal-mlp"),
    "smollm2-l6-smollm2-135m-cs16-mean-w1024-causal-mlp":
        (16, "mean", "model/weights/smollm2-135m-cs16-mean-w1024-causal-mlp"),
    "smollm2-l6-smollm2-135m-cs16-concat-w1024-causal-mlp":
        (16, "concat", "model/weights/smollm2-135m-cs16-concat-w1024-causal-mlp"),
}

QWEN3 = {  # 0.6b-4b-cs16-mean-w1024-causal-mlp
    "encoder": "Qwen/Qwen3-Embedding-0.6B",
    "decoder": "Qwen/Qwen3-4B-Instruct-2507",
    "encoder_short": "0.6b",
    "decoder_short": "4b",
    "lclm": {"compression_ratio": 16, "encoder_window_size": 1024, "pooling": "mean", "encoder_mask_type": "causal",
             "boundary_overlap": 0, "adapter_type": "mlp", "trained": True},
    "stages": [
        {"stage": 0, "steps": 2000, "lr": {"adapter": 0.001}, "objectives": {"interleaved": 1.0, "reconstruction": 1.0},
         "batch_size": 4, "grad_accum": 4, "warmup_steps": 100, "weight_decay": 0.0, "max_grad_norm": 1.0},
        {"stage": 1, "steps": 2000, "lr": {"adapter": 0.0001, "encoder": 5e-05},
         "objectives": {"interleaved": 1.0, "reconstruction": 1.0}, "batch_size": 4, "grad_accum": 4,
         "warmup_steps": 100, "weight_decay": 0.0, "max_grad_norm": 1.0},
        {"stage": 2, "steps": 4000, "lr": {"adapter": 5e-05, "encoder": 2e-05, "decoder": 1e-05},
         "objectives": {"interleaved": 1.0, "reconstruction": 0.5}, "batch_size": 4, "grad_accum": 4,
         "warmup_steps": 100, "weight_decay": 0.0, "max_grad_norm": 1.0},
        {"stage": 3, "steps": 1000, "lr": {"adapter": 2e-05, "encoder": 1e-05, "decoder": 5e-06},
         "objectives": {"task": 1.0, "interleaved": 0.25, "reconstruction": 0.25}, "batch_size": 4, "grad_accum": 4,
         "warmup_steps": 50, "weight_decay": 0.0, "max_grad_norm": 1.0},
    ],
    "corpus": "data/corpus-qwen3.safetensors.xz",
    "encoder_weights": "full",
    "decoder_weights": "full",
    "lora": LORA,
    "decoder_lora": None,
    "interleaved": {"seq_tokens": 8192, "memory_fraction": 0.5, "span_tokens": (256, 4096)},
    "reconstruction": {"span_tokens": (64, 1024)},
    "task": {"context_tokens": (1024, 16384), "tasks": TASKS, "expand_share": 0.25, "chunk_tokens": 512},
    "precision": "bf16",
    "gradient_checkpointing": True,
    "save_every": 500,
    "keep_checkpoints": 2,
    "log_every": 10,
    "eval_batches": 8,
    "save_dtype": "bfloat16",
    "seed": 0,
    "publish_to": None,
}


def expected_settings(name: str) -> dict:
    if name == "0.6b-4b-cs16-mean-w1024-causal-mlp":
        return QWEN3
    ratio, pooling, publish_to = SMOLLM2_VARIANTS[name]
    return {**SMOLLM2, "lclm": {**SMOLLM2["lclm"], "compression_ratio": ratio, "pooling": pooling},
            "publish_to": publish_to}


def test_configs_hold_the_seven_runs():
    assert run_names() == sorted([*SMOLLM2_VARIANTS, "0.6b-4b-cs16-mean-w1024-causal-mlp"])


@pytest.mark.parametrize("name", [*SMOLLM2_VARIANTS, "0.6b-4b-cs16-mean-w1024-causal-mlp"])
def test_every_run_name_loads_with_its_settings(name):
    assert RunConfig.load(name).to_dict() == expected_settings(name)
    # as a path too: the name's .yaml in configs/, the path a file of its own would have
    assert RunConfig.load(CONFIG_DIR / f"{name}.yaml").to_dict() == expected_settings(name)


@pytest.mark.parametrize("name", run_names())
def test_shipped_run_configs_are_valid_and_named_by_their_settings(name):
    run = RunConfig.load(name)
    assert run.name == name
    assert [s.stage for s in run.stages] == [0, 1, 2, 3]
    if run.decoder == "HuggingFaceTB/SmolLM2-135M-Instruct":
        assert run.decoder_weights == run.encoder_weights == "lora"
        assert run.publish_to == f"model/weights/smollm2-135m-{run.lclm.name}"


def test_a_family_file_expands_into_its_variants(tmp_path):
    (tmp_path / "a-b.yaml").write_text(
        "variants: {compression_ratio: [2, 4], encoder_mask_type: [causal, bidirectional]}\n"
        "encoder: enc\ndecoder: dec\nencoder_short: a\ndecoder_short: b\n"
        "lclm: {encoder_window_size: 64, pooling: concat}\npublish_to: 'out/{variant}'\n"
        "interleaved: {seq_tokens: 64, span_tokens: [8, 16]}\n"
        "stages: [{stage: 0, steps: 1, lr: {adapter: 1.0e-3}, objectives: {interleaved: 1.0}}]\n")
    names = ["a-b-cs2-concat-w64-bidirectional-mlp", "a-b-cs2-concat-w64-causal-mlp",
             "a-b-cs4-concat-w64-bidirectional-mlp", "a-b-cs4-concat-w64-causal-mlp"]
    assert run_names(tmp_path) == names
    run = RunConfig.load(tmp_path / "a-b-cs4-concat-w64-bidirectional-mlp.yaml")
    assert (run.name, run.publish_to) == ("a-b-cs4-concat-w64-bidirectional-mlp",
                                          "out/cs4-concat-w64-bidirectional-mlp")
    with pytest.raises(ValueError, match="describes several runs; load one of them by name: a-b-cs2-concat"):
        RunConfig.load(tmp_path / "a-b.yaml")
    with pytest.raises(FileNotFoundError, match="no run config"):
        RunConfig.load(tmp_path / "a-b-cs8-concat-w64-causal-mlp")


def test_the_family_file_is_not_a_run():
    with pytest.raises(ValueError, match="smollm2-l6-smollm2-135m.yaml describes several runs"):
        RunConfig.load("smollm2-l6-smollm2-135m")
