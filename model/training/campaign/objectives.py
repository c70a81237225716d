"""The model as a recipe trains it (which groups, decoder LoRA on or off, frozen weights' type)
and the losses of a step: cross-entropy, distillation from the full-context decoder or from a
teacher's cached replies, and the warm start of the encoder and adapter.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from model.training.campaign.data import CampaignData, StepData
from model.training.campaign.recipes import Recipe
from model.training.examples import IGNORE, Sample, collate
from model.training.modeling import is_peft
from model.training.teacher import soft_loss


# ---- the model ---------------------------------------------------------------------------------
def set_decoder_lora(decoder: torch.nn.Module, enabled: bool) -> None:
    """Switch the decoder's LoRA matrices on or off; the memory-token rows stay in use."""
    from peft.tuners.lora import LoraLayer

    for module in decoder.modules():
        if isinstance(module, LoraLayer):
            module.enable_adapters(enabled)


def trainable_groups(lclm, recipe: Recipe) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """The parameters the recipe trains, by learning-rate group, with their names in the LCLM."""
    for p in lclm.parameters():
        p.requires_grad_(False)
    groups: dict[str, list] = {"adapter": [], "encoder": [], "decoder": [], "tags": []}
    for name, p in lclm.named_parameters():
        if name.startswith("adapter."):
            if recipe.train_adapter:
                groups["adapter"].append((name, p))
        elif name.startswith("encoder.") and "lora_" in name and recipe.train_encoder:
            groups["encoder"].append((name, p))
        elif name.startswith("decoder.") and "trainable_tokens_" in name:
            groups["tags"].append((name, p))
        elif name.startswith("decoder.") and "lora_" in name and recipe.train_decoder:
            groups["decoder"].append((name, p))
    for params in groups.values():
        for _, p in params:
            p.requires_grad_(True)
    return {g: ps for g, ps in groups.items() if ps}


def freeze_to(lclm, dtype: torch.dtype) -> None:
    """Store the weights nothing trains in `dtype` (no cast per forward under autocast)."""
    for p in lclm.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


def decoder_parts(decoder):
    """(transformer body, LM head) of a causal LM, PEFT-wrapped or not."""
    base = decoder.get_base_model() if is_peft(decoder) else decoder
    return base.model, base.lm_head


def label_logits(lclm, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a label, and those labels: ([n, vocab], [n]).
    Only those positions go through the LM head."""
    device = lclm.device
    input_ids = batch.input_ids.to(device)  # [B, L]
    embeds = lclm.decoder.get_input_embeddings()(input_ids)  # [B, L, D]
    if batch.regions:
        latents = lclm.encode_many(batch.documents)  # [M_d, D] per document
        flat = torch.cat([latents[d][a:b] for d, a, b in batch.regions])  # [placeholders, D]
        mask = (input_ids == lclm.memory_token_id).unsqueeze(-1)  # [B, L, 1]
        embeds = embeds.masked_scatter(mask, flat.to(embeds.dtype))
    body, head = decoder_parts(lclm.decoder)
    padded = bool((batch.attention_mask == 0).any())
    hidden = body(inputs_embeds=embeds, attention_mask=batch.attention_mask.to(device) if padded else None,
                  use_cache=False).last_hidden_state  # [B, L, D]
    targets = batch.labels[:, 1:].to(device)  # [B, L-1]
    where = targets != IGNORE
    return head(hidden[:, :-1][where]).float(), targets[where]  # [n, vocab], [n]


# ---- objectives ---------------------------------------------------------------------------------
def teacher_logits(lclm, sources: list[tuple[list[int], list[tuple[str, int]]]]) -> torch.Tensor:
    """The frozen decoder's logits on each raw sequence at the positions that predict the
    plain-text tokens, in the order `label_logits` yields them: [n, vocab]."""
    raws = torch.tensor([raw for raw, _ in sources], device=lclm.device)  # [B, T], equal lengths
    keep = torch.zeros_like(raws, dtype=torch.bool)
    for row, (_, spans) in enumerate(sources):
        at = 0
        for kind, n in spans:
            if kind == "text":
                keep[row, at:at + n] = True
            at += n
    keep[:, 0] = False  # nothing predicts the first token
    body, head = decoder_parts(lclm.decoder)
    with torch.no_grad():
        hidden = body(input_ids=raws, use_cache=False).last_hidden_state  # [B, T, D]
        return head(hidden[:, :-1][keep[:, 1:]]).float()  # [n, vocab]


def step_loss(lclm, data: StepData, pad_id: int) -> tuple[torch.Tensor, int, int]:
    """(loss, correct top-1 predictions, predicted tokens) of one step."""
    batch = collate(data.samples, pad_id)
    logits, targets = label_logits(lclm, batch)
    if any(sample.soft is not None for sample in data.samples):
        loss = mixed_loss(logits, targets, data.samples)
    elif data.objective == "distill":
        target = teacher_logits(lclm, data.sources)
        if target.shape != logits.shape:
            raise ValueError(f"teacher positions {tuple(target.shape)} differ from the student's {tuple(logits.shape)}")
        loss = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target, -1), log_target=True, reduction="batchmean")
    else:
        loss = F.cross_entropy(logits, targets)
    correct = int((logits.detach().argmax(-1) == targets).sum())
    return loss, correct, int(targets.numel())


def mixed_loss(logits: torch.Tensor, targets: torch.Tensor, samples: list[Sample]) -> torch.Tensor:
    """Mean per-position loss: distillation (`soft_loss`) on the positions of samples that carry a
    teacher's distribution, cross-entropy on the others. logits: [n, vocab] in sample order."""
    counts = [sample.label_count for sample in samples]
    if sum(counts) != len(targets):
        raise ValueError(f"samples hold {sum(counts)} label positions, the batch {len(targets)}")
    hard = F.cross_entropy(logits, targets, reduction="none")  # [n]
    parts, at = [], 0
    for sample, n in zip(samples, counts):
        if sample.soft is None:
            parts.append(hard[at:at + n])
        else:
            top_ids = torch.tensor(sample.soft[0], device=logits.device)  # [n, k]
            top_logprobs = torch.tensor(sample.soft[1], device=logits.device)  # [n, k]
            parts.append(soft_loss(logits[at:at + n], top_ids, top_logprobs))
        at += n
    return torch.cat(parts).mean()


def embedding_targets(lclm, documents: list[list[int]], kind: str = "superposed") -> list[torch.Tensor]:
    """What `warm_start` pulls each document's latents towards, for every group of N tokens
    ([ceil(L/N), D] per document), in the space the decoder reads:
    - superposed: the sum of the group's decoder input embeddings over sqrt(N) (about one
      token embedding's norm): every token of the group, in superposition;
    - first: the embedding of the group's first token: one real token per latent, which a
      decoder reads (and copies) as it is."""
    n = lclm.config.compression_ratio
    table = lclm.decoder.get_input_embeddings()
    targets = []
    with torch.no_grad():
        for ids in documents:
            groups = math.ceil(len(ids) / n)
            embeds = table(torch.tensor(ids, device=lclm.device)).float()  # [L, D]
            if kind == "first":
                targets.append(embeds[::n])  # [groups, D]
                continue
            padded = embeds.new_zeros(groups * n, embeds.shape[-1])  # [groups*N, D], zero tail
            padded[: len(ids)] = embeds
            targets.append(padded.view(groups, n, -1).sum(1) / math.sqrt(n))  # [groups, D]
    return targets


def warm_start(lclm, data: "CampaignData", groups, steps: int, autocast: bool, say, kind: str = "superposed",
               until: float = math.inf) -> dict:
    """Regress the encoder and adapter (no decoder pass) so that the latents start as the
    superposed embeddings of their tokens (`embedding_targets`): information the decoder's
    copying heads can read from the first training step, instead of random vectors it learns
    to ignore. A frozen decoder is not enough to read them (it continues them as text); the
    recipe's decoder LoRA learns that. Its own AdamW; stops early at `until` (time.perf_counter);
    returns the steps done, tokens and the first and last step's relative squared error."""
    params = [p for g in ("encoder", "adapter") for _, p in groups.get(g, [])]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    tokens, errors = 0, []
    for step in range(steps):
        if time.perf_counter() > until:
            say(f"warm start stopped after {step} of {steps} steps: half the box is spent")
            break
        batch = data.step(step, 0, objective="reconstruction")
        documents = [s.documents[0] for s in batch.samples]
        with torch.autocast(lclm.device.type, dtype=torch.bfloat16, enabled=autocast):
            latents = torch.cat(lclm.encode_many(documents)).float()  # [M, D]
        target = torch.cat(embedding_targets(lclm, documents, kind))  # [M, D]
        loss = (latents - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean()  # relative squared error
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += sum(len(d) for d in documents)
        errors.append(float(loss.detach()))
        if step % 50 == 0 or step == steps - 1:
            say(f"warm start {step + 1}/{steps}: relative error {errors[-1]:.3f}")
    return {"steps": len(errors), "target": kind, "tokens": tokens,
            "first_error": round(errors[0], 4) if errors else None,
            "relative_error": round(errors[-1], 4) if errors else None}
