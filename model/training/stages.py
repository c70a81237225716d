"""The four stages of the authors' recipe, each a small class that names the parameter
groups it trains. A group is "adapter", "encoder" or "decoder"; with LoRA components the
encoder and decoder groups are their LoRA matrices (plus, for the decoder, the rows of the
new memory tokens), with full components all of their weights."""

from __future__ import annotations

from torch import nn


class Stage:
    number: int
    name: str
    trains: tuple[str, ...]
    default_objectives: dict[str, float]


class AdapterWarmup(Stage):
    number, name, trains = 0, "adapter-warmup", ("adapter",)
    default_objectives = {"interleaved": 1.0, "reconstruction": 1.0}


class EncoderTraining(Stage):
    number, name, trains = 1, "encoder", ("adapter", "encoder")
    default_objectives = {"interleaved": 1.0, "reconstruction": 1.0}


class EndToEnd(Stage):
    number, name, trains = 2, "end-to-end", ("adapter", "encoder", "decoder")
    default_objectives = {"interleaved": 1.0, "reconstruction": 0.5}


class SupervisedFineTuning(Stage):
    number, name, trains = 3, "sft", ("adapter", "encoder", "decoder")
    default_objectives = {"task": 1.0, "interleaved": 0.25, "reconstruction": 0.25}


STAGES: dict[int, type[Stage]] = {cls.number: cls for cls in (AdapterWarmup, EncoderTraining, EndToEnd,
                                                                 SupervisedFineTuning)}


def trainable_names(module: nn.Module, lora: bool) -> set[str]:
    """Names of the parameters of one component that training may touch: its LoRA
    matrices and trainable token rows (PEFT) or all of its weights (full)."""
    if not lora:
        return {name for name, _ in module.named_parameters()}
    return {name for name, _ in module.named_parameters() if "lora_" in name or "trainable_tokens_" in name}


def parameter_groups(lclm: nn.Module, lora: dict[str, bool]) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every parameter group of an LCLM (adapter, encoder, decoder): (name, parameter) pairs."""
    components = {"adapter": lclm.adapter, "encoder": lclm.encoder.model, "decoder": lclm.decoder}
    groups = {}
    for group, module in components.items():
        names = trainable_names(module, lora.get(group, False))
        groups[group] = [(n, p) for n, p in module.named_parameters() if n in names]
    return groups


def apply_stage(lclm: nn.Module, stage: int, lora: dict[str, bool]) -> dict[str, list[nn.Parameter]]:
    """Freeze everything, then unfreeze the groups `stage` trains; returns them by group."""
    for p in lclm.parameters():
        p.requires_grad_(False)
    groups = parameter_groups(lclm, lora)
    trained = {}
    for group in STAGES[stage].trains:
        params = [p for _, p in groups[group]]
        for p in params:
            p.requires_grad_(True)
        trained[group] = params
    return trained
