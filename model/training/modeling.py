"""A trainable LCLM: built from the base models (stage 0) or from a checkpoint in the
published layout (later stages, resume), with LoRA or full components; the training
forward; and saving checkpoints in the published layout that model.loading reads.

LoRA components are PEFT adapters whose `base_model_name_or_path` is the run's base spec
(for the embedded default "HuggingFaceTB/SmolLM2-135M-Instruct", which model.loading.LOCAL_BASES
maps to the converted local copy). The decoder's LoRA also carries the rows of the three memory
tokens (PEFT `trainable_token_indices`, saved as full values), so a checkpoint does not
depend on how a base's new rows happened to be initialised.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.checkpoint import ADAPTER_FILE, add_memory_tokens, quiet_transformers
from model.lclm import LCLM
from model.loading import assemble_lclm, base_path, load_tokenizer
from model.prompts import MEMORY_TOKENS
from model.training.config import RunConfig


def is_peft(module: nn.Module) -> bool:
    return hasattr(module, "peft_config")


def lora_config(run: RunConfig, kind: str, tokenizer):
    from peft import LoraConfig

    s = run.decoder_lora if kind == "decoder" and run.decoder_lora is not None else run.lora
    extra = {}
    if kind == "decoder":
        vocab = tokenizer.get_vocab()
        extra = {"task_type": "CAUSAL_LM", "trainable_token_indices": [vocab[t] for t in MEMORY_TOKENS]}
    else:
        extra = {"task_type": "FEATURE_EXTRACTION"}
    return LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(s.target_modules),
                      **extra)


def load_trainable_component(run: RunConfig, kind: str, init_from: Path | None, data_dir: Path | None):
    """(model, tokenizer) of one component in float32, ready to train: the run's base model
    (with a fresh LoRA where the run trains one) or the checkpoint `init_from`'s component
    (its LoRA unmerged and trainable)."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if kind == "decoder" else AutoModel
    spec = run.decoder if kind == "decoder" else run.encoder
    lora = (run.decoder_weights if kind == "decoder" else run.encoder_weights) == "lora"
    source = init_from / kind if init_from is not None else None
    source_is_lora = source is not None and (source / "adapter_config.json").is_file()
    if source is not None and lora != source_is_lora:
        raise ValueError(f"{source} holds {'LoRA' if source_is_lora else 'full'} weights, but this run trains "
                         f"{'LoRA' if lora else 'full'} {kind} weights")
    base = source if source is not None and not lora else base_path(spec, kind, data_dir)
    with quiet_transformers():
        model = auto.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
    tokenizer = load_tokenizer(*([source] if source is not None else []), base)
    if kind == "decoder":
        with torch.random.fork_rng(devices=[]), quiet_transformers():
            torch.manual_seed(run.seed)  # new rows of a base without memory tokens: the same on every start
            add_memory_tokens(tokenizer, model)
        model.config.use_cache = False
    if lora:
        if source is not None:
            model = PeftModel.from_pretrained(model, source, is_trainable=True)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(run.seed)  # the same LoRA initialisation on every start
                model = get_peft_model(model, lora_config(run, kind, tokenizer))
            model.peft_config["default"].base_model_name_or_path = spec
    return model, tokenizer


def build_trainable(run: RunConfig, init_from: str | Path | None = None, data_dir: Path | None = None) -> LCLM:
    """The run's LCLM in float32 on the CPU: from the base models when `init_from` is None,
    else from that checkpoint (published layout; its LoRA components stay unmerged)."""
    init_from = Path(init_from) if init_from is not None else None
    decoder, decoder_tokenizer = load_trainable_component(run, "decoder", init_from, data_dir)
    encoder, encoder_tokenizer = load_trainable_component(run, "encoder", init_from, data_dir)
    config = type(run.lclm).from_dict({**run.lclm.to_dict(), "trained": True})
    lclm = assemble_lclm(config, encoder, encoder_tokenizer, decoder, decoder_tokenizer,
                         adapter_file=init_from / ADAPTER_FILE if init_from is not None else None,
                         checkpoint_id=f"training:{run.name}", seed=run.seed)
    return lclm.float()


def lora_flags(run: RunConfig) -> dict[str, bool]:
    return {"encoder": run.encoder_weights == "lora", "decoder": run.decoder_weights == "lora"}


def enable_gradient_checkpointing(lclm: LCLM) -> None:
    for model in (lclm.encoder.model, lclm.decoder):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class LCLMForTraining(nn.Module):
    """The loss forward as one module, so that DDP/FSDP wrap it whole (accelerate.prepare)."""

    def __init__(self, lclm: LCLM):
        super().__init__()
        self.lclm = lclm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                documents: list[list[int]], regions: list[tuple[int, int, int]]) -> torch.Tensor:
        lclm = self.lclm
        embeds = lclm.decoder.get_input_embeddings()(input_ids)  # [B, L, D]
        if regions:
            latents = lclm.encode_many(documents)  # [M_d, D] per document
            flat = torch.cat([latents[d][a:b] for d, a, b in regions])  # [placeholders, D], prompt order
            mask = (input_ids == lclm.memory_token_id).unsqueeze(-1)  # [B, L, 1]
            if int(mask.sum()) != flat.shape[0]:
                raise ValueError(f"{int(mask.sum())} memory placeholders for {flat.shape[0]} latents")
            embeds = embeds.masked_scatter(mask, flat.to(embeds.dtype))  # latents over the placeholders, row-major
        out = lclm.decoder(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, use_cache=False)
        return out.loss


# ---- saving in the published layout ----------------------------------------------------------
def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def save_checkpoint(lclm: LCLM, directory: str | Path, state: dict[str, torch.Tensor] | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write `lclm` in the published layout: LoRA components as PEFT adapters (with the
    memory-token rows), full components as HF models, the adapter as safetensors.
    `state`: a full state dict of LCLMForTraining (from accelerate under FSDP); default
    the module's own. `dtype`: cast weights on the way out (e.g. bfloat16 to publish)."""
    directory = Path(directory)
    if state is None:
        state = {f"lclm.{k}": v for k, v in lclm.state_dict().items()}
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    (directory / "adapter").mkdir(parents=True, exist_ok=True)
    lclm.config.save(directory / "model_config.json")
    for kind, model, tokenizer, prefix in (
        ("decoder", lclm.decoder, lclm.decoder_tokenizer, "lclm.decoder."),
        ("encoder", lclm.encoder.model, lclm.encoder_tokenizer, "lclm.encoder.model."),
    ):
        sub = _sub(state, prefix)
        if is_peft(model):
            sub = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in sub.items()
                   if "lora_" in k or "trainable_tokens_" in k}
            # the memory-token rows travel as trainable tokens, not as a copy of the whole embedding
            model.save_pretrained(directory / kind, state_dict=sub, save_embedding_layers=False)
        else:
            model.save_pretrained(directory / kind, state_dict=_cast(sub, dtype))
        tokenizer.save_pretrained(directory / kind)
    save_file(_cast(_sub(state, "lclm.adapter."), dtype), directory / ADAPTER_FILE)
    return directory


# ---- optimizer state without pickle: tensors in safetensors, the rest in JSON ---------------------
def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    save_file(tensors, path.with_suffix(".safetensors"))
    path.with_suffix(".json").write_text(json.dumps({"param_groups": state["param_groups"], "scalars": scalars}))


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    meta = json.loads(path.with_suffix(".json").read_text())
    tensors = load_file(path.with_suffix(".safetensors"))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
