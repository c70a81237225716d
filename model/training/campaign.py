"""A training campaign: one embedded LCLM variant trained in wall-clock boxes that resume.

    python -m model.training.campaign --variant cs4-concat --recipe curriculum --minutes 120 \
        --state runs/cs4-concat/state --out runs/cs4-concat/out

Each call trains for at most `--minutes`, stops cleanly before the box ends (or on Ctrl-C /
SIGTERM), and leaves:
  STATE/  trainable.safetensors   the trained tensors (LoRA matrices, memory rows, adapter), float32
          optimizer.safetensors   AdamW moments; optimizer.json: the rest of the optimizer state
          state.json              recipe, variant, step, tokens per objective, CPU and wall seconds,
                                  every validation result so far
          rng.safetensors         torch's RNG state (data order is a pure function of the step)
  OUT/    final/                  the variant in the published layout, bfloat16 (load_lclm reads it)
          metrics.json            the validation curve and the run's settings
          curve.png               teacher-forced and free-running accuracy against tokens and time
The next call with the same STATE resumes where this one stopped. `--init-from DIR` starts a
new STATE from a checkpoint in the published layout (e.g. the committed model/weights/...).

On a lent GPU machine (docs/gpu.md):
    python -m model.training.campaign --variants cs4-concat,cs16-mean --minutes 2.5 \
        --state runs/gpu/state --out runs/gpu/out --returned runs/gpu/returned --pack $OUT
trains the variants in order, each in an equal share of what is left of the box, under
STATE/<variant> and OUT/<variant>; on CUDA a throughput probe (`--probe-s`, 20 s) first picks the
span tokens per step. `--pack` writes each variant's OUT/ and state.json as <variant>.tar.N parts
that the machine can bring back; `--returned` unpacks such parts, and the call continues from
their final/ (bf16) with a fresh optimizer; `--publish-only` unpacks and publishes, here.

A recipe (RECIPES) says what is trained (encoder LoRA, adapter, memory-tag rows, optionally
decoder LoRA), on which objectives (reconstruction of spans, interleaved next-token, or
interleaved distillation from the full-context decoder; and, to answer questions, `qa`,
`expand` and `anchor` on question cases made by code, model/training/data/questions.py, with
the base decoder's cached replies as the teacher, model/training/teacher.py), the span-length
curriculum, and an optional warm start of the encoder and adapter before the first step
(`warm_start`). Question recipes also validate answers, EXPAND's first chunk and the text anchor.
Validation, every `--eval-minutes`: teacher-forced top-1 token accuracy on fixed held-back
64-token spans (at step 0 this is the decoder's prior: untrained latents tell it nothing); the
same with each span given another span's latents (a decoder LoRA also learns the corpus, which
lifts both: the gap is what the latents carry); and free-running reconstruction token accuracy
(greedy, the studio's Reconstruction path) on a few of them.
    python -m model.training.campaign --variant cs4-concat --validate-only --init-from DIR
prints that validation of any published-layout checkpoint (without --init-from: the untrained
variant) as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from model import precision
from model.chunking import DEFAULT_CHUNK_TOKENS, chunk_text
from model.config import RATIOS
from model.fidelity import reconstruct, token_accuracy
from model.generation import decode, prefill, stop_token_ids
from model.precision import fast_dtype
from model.prompts import PROMPT_PROFILES, memory_region, reconstruction_prompt
from model.training.config import RunConfig
from model.training.data.corpus import stable_hash
from model.training.data.questions import Question, draw, make_question, right
from model.training.data.shards import Split, load_corpus
from model.training.data.synthetic import Haystack, gather_haystack
from model.training.examples import IGNORE, ExampleBuilder, Sample, collate, plan_spans
from model.training.modeling import build_trainable, is_peft, load_optimizer, save_checkpoint, save_optimizer
from model.training.teacher import TeacherCache, TeacherReply, soft_loss
from model.training.trainer import StopRequested

VALIDATION_SPAN = 64  # tokens per validation span (16 latents at 1:4)
VALIDATION_SPANS = 32  # teacher-forced
FREE_RUNNING_SPANS = 4  # greedy reconstruction, at the start and end of each call
SAVE_MARGIN_S = 45.0  # stop this long before the box ends, for validation and saving


@dataclass(frozen=True)
class Phase:
    """Reconstruction spans of `span_tokens` until `until_tokens` span tokens are trained (0: no end)."""

    span_tokens: int
    until_tokens: int = 0


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    phases: tuple[Phase, ...]
    # reconstruction | reconstruction_long | reconstruction_facts | interleaved | distill | qa | expand | anchor
    # -> sampling weight
    objectives: dict[str, float]
    train_decoder: bool = False  # decoder LoRA trained (else the decoder is frozen and its LoRA off)
    train_encoder: bool = True
    train_adapter: bool = True  # False (with train_encoder False): the latents stay exactly as they are
    encoder_lora_r: int = 64
    decoder_lora_r: int = 16
    lr: dict[str, float] = field(default_factory=lambda: {"adapter": 1e-3, "encoder": 1e-3, "decoder": 5e-4,
                                                          "tags": 1e-3})
    batch_tokens: int = 512  # span tokens per step (spans of 16: 32 a step; of 64: 8; of 256: 2)
    warmup_steps: int = 20
    interleaved_tokens: int = 512  # raw tokens of one interleaved / distillation sequence
    interleaved_spans: tuple[int, int] = (16, 128)  # compressed span lengths inside it
    reconstruction_range: tuple[int, int] | None = None  # uniform span lengths instead of phases
    warm_start_steps: int = 0  # steps of `warm_start` before the first training step of a fresh state
    warm_target: str = "superposed"  # what warm_start pulls latents towards (embedding_targets)
    precision: str = "auto"  # auto (the device's fast type) | fp32
    # question objectives (qa, expand, anchor): context tokens of questions per step, the lengths drawn
    # (model/training/data/questions.py), the prompt profiles by weight, and the teacher's reply limit
    question_tokens: int = 1024
    question_lengths: tuple[int, ...] = (256, 512, 1024, 2048)
    profiles: dict[str, float] = field(default_factory=lambda: {"studio": 0.7, "paper": 0.3})
    teacher_tokens: int = 32
    qa_target: str = "teacher"  # teacher: the base decoder's reply where right | reference: always the bare answer
    question_kinds: dict[str, float] | None = None  # kind -> weight (None: questions.KIND_WEIGHTS)
    long_span: int = 256  # reconstruction_long: span tokens (the studio's chunk)

    def phase(self, span_tokens_done: int) -> Phase:
        for phase in self.phases:
            if phase.until_tokens == 0 or span_tokens_done < phase.until_tokens:
                return phase
        return self.phases[-1]


# The recipes compared in the study (bench/results/training/), the chosen one (the most validation accuracy
# per CPU-minute there) first.
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("warm-lora-recon", "lora-recon after a warm start: the encoder and adapter first regressed (300 steps, "
           "no decoder pass) onto the superposed token embeddings of each latent's group",
           phases=(Phase(64),), objectives={"reconstruction": 1.0}, train_decoder=True, warm_start_steps=300),
    Recipe("answer", "question answering from latents, kept able to read text: questions made by code answered as "
           "the base decoder answers them from the raw text (distilled where its answer is right, the reference "
           "answer otherwise), EXPAND episodes, a text anchor (the base decoder's replies to text-only prompts) and "
           "reconstruction of 64- and 256-token spans; every group trained, the encoder and adapter at a fifth of "
           "warm-lora-recon's rates (at half of them reconstruction fell from 0.92 to 0.55 in 26 steps)",
           phases=(Phase(64),), objectives={"qa": 0.55, "expand": 0.1, "anchor": 0.1, "reconstruction": 0.15,
                                            "reconstruction_long": 0.10},
           train_decoder=True, lr={"adapter": 2e-4, "encoder": 2e-4, "decoder": 2.5e-4, "tags": 2.5e-4}),
    Recipe("answer-expand", "the answer recipe weighted towards EXPAND episodes (choosing the chunk that holds the "
           "answer from its latents, then answering from its text), for the high ratios that EXPAND serves",
           phases=(Phase(64),), objectives={"expand": 0.4, "qa": 0.25, "anchor": 0.15, "reconstruction": 0.1,
                                            "reconstruction_long": 0.1},
           train_decoder=True, lr={"adapter": 2e-4, "encoder": 2e-4, "decoder": 2.5e-4, "tags": 2.5e-4}),
    Recipe("answer-ref", "the answer recipe with the reference answer as the only question target (cross-entropy on "
           "the bare answer, every loss token a token of the answer, where distillation spreads it over the base "
           "decoder's sentence) on documents of 256-1,024 tokens, reconstruction kept beside it and the text anchor; "
           "the encoder and adapter at half warm-lora-recon's rates",
           phases=(Phase(64),), objectives={"qa": 0.6, "anchor": 0.15, "reconstruction": 0.25},
           question_lengths=(256, 512, 1024), qa_target="reference", train_decoder=True,
           lr={"adapter": 5e-4, "encoder": 5e-4, "decoder": 2.5e-4, "tags": 5e-4}),
    Recipe("answer-facts", "answer-ref on the value look-ups only (fact, distractors, register, chain) over "
           "documents of 256-512 tokens, where most answer tokens are digits: the fine fidelity that exact answers "
           "need, before longer documents and the other kinds",
           phases=(Phase(64),), objectives={"qa": 0.65, "anchor": 0.1, "reconstruction": 0.25},
           question_lengths=(256, 512), qa_target="reference",
           question_kinds={"fact": 0.4, "distractors": 0.25, "table": 0.25, "chain": 0.1}, train_decoder=True,
           lr={"adapter": 5e-4, "encoder": 5e-4, "decoder": 2.5e-4, "tags": 5e-4}),
    Recipe("answer-digits", "answer-facts with a third of its steps reconstructing 64-token spans of the question "
           "documents that hold the answer value (reconstruction_facts): the exact digits and length of a number "
           "read back from its latents, which the look-ups' replies miss by one digit",
           phases=(Phase(64),), objectives={"reconstruction_facts": 0.35, "qa": 0.35, "anchor": 0.1,
                                            "reconstruction": 0.2},
           question_lengths=(256, 512), qa_target="reference",
           question_kinds={"fact": 0.4, "distractors": 0.25, "table": 0.25, "chain": 0.1}, train_decoder=True,
           lr={"adapter": 5e-4, "encoder": 5e-4, "decoder": 2.5e-4, "tags": 5e-4}),
    Recipe("answer-frozen", "the answer recipe with the encoder and adapter frozen (the latents exactly as shipped): "
           "replies take the answer's form but carry no digits of the document (0 of 12 after 339 steps)",
           phases=(Phase(64),), objectives={"qa": 0.45, "expand": 0.15, "anchor": 0.15, "reconstruction": 0.15,
                                            "reconstruction_long": 0.10},
           train_decoder=True, train_encoder=False, train_adapter=False,
           lr={"adapter": 0.0, "encoder": 0.0, "decoder": 1.5e-4, "tags": 1e-4}),
    Recipe("answer-expand-frozen", "answer-expand with the encoder and adapter frozen",
           phases=(Phase(64),), objectives={"expand": 0.4, "qa": 0.25, "anchor": 0.15, "reconstruction": 0.1,
                                            "reconstruction_long": 0.1},
           train_decoder=True, train_encoder=False, train_adapter=False,
           lr={"adapter": 0.0, "encoder": 0.0, "decoder": 1.5e-4, "tags": 1e-4}),
    Recipe("lora-recon", "decoder LoRA (so the decoder learns to read latents) + encoder LoRA + adapter, "
           "reconstruction of 64-token spans",
           phases=(Phase(64),), objectives={"reconstruction": 1.0}, train_decoder=True),
    Recipe("frozen-recon", "frozen decoder; encoder LoRA + adapter on reconstruction of 64-token spans",
           phases=(Phase(64),), objectives={"reconstruction": 1.0}),
    Recipe("curriculum", "decoder LoRA + encoder LoRA + adapter, reconstruction, spans 16 -> 64 -> 256",
           phases=(Phase(16, 60_000), Phase(64, 300_000), Phase(256)), objectives={"reconstruction": 1.0},
           train_decoder=True),
    Recipe("distill", "frozen decoder; reconstruction plus interleaved sequences whose target is the "
           "full-context decoder's next-token distribution", phases=(Phase(64),),
           objectives={"reconstruction": 0.5, "distill": 0.5}),
    Recipe("current", "the four-stage config's first stage: adapter only, interleaved + reconstruction "
           "(spans 32-512, sequences of 2048), LoRA r=16, float32, lr 1e-3",
           phases=(Phase(64),), objectives={"interleaved": 1.0, "reconstruction": 1.0}, train_encoder=False,
           encoder_lora_r=16, lr={"adapter": 1e-3, "encoder": 1e-3, "decoder": 5e-4, "tags": 1e-3},
           batch_tokens=16 * 272, warmup_steps=30, interleaved_tokens=2048, interleaved_spans=(128, 1024),
           reconstruction_range=(32, 512), precision="fp32"),
)}

VARIANTS = {f"cs{n}-{p}": f"smollm2-l6-smollm2-135m-cs{n}-{p}-w1024-causal-mlp"
            for n in RATIOS for p in ("concat", "mean")}


# ---- the model ---------------------------------------------------------------------------------
def run_config(variant: str, recipe: Recipe, corpus: str | None) -> RunConfig:
    if variant not in VARIANTS:
        raise SystemExit(f"error: unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    run = RunConfig.load(VARIANTS[variant])
    return replace(run, lora=replace(run.lora, r=recipe.encoder_lora_r, alpha=2 * recipe.encoder_lora_r),
                   decoder_lora=replace(run.lora, r=recipe.decoder_lora_r, alpha=2 * recipe.decoder_lora_r),
                   **({"corpus": corpus} if corpus else {}))


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
@dataclass
class StepData:
    """One training step's samples, all of one objective."""

    objective: str
    samples: list[Sample]
    span_tokens: int = 0  # reconstruction span length of a curriculum phase (0: other objectives)
    # interleaved objectives: each sample's raw decoder ids and its ("memory" | "text", length) spans
    sources: list[tuple[list[int], list[tuple[str, int]]]] = field(default_factory=list)


def weighted_choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    """A key of `weights` drawn with probability proportional to its value (keys in sorted order)."""
    names = sorted(weights)
    shares = np.array([weights[n] for n in names])
    return names[int(rng.choice(len(names), p=shares / shares.sum()))]


class CampaignData:
    """Samples of each objective; every micro-batch a pure function of (seed, split, step) (the
    teacher's replies, which some objectives read, are cached in `teacher`)."""

    def __init__(self, builder: ExampleBuilder, corpus, recipe: Recipe, seed: int,
                 teacher: TeacherCache | None = None, autocast: bool = False):
        self.builder, self.corpus, self.recipe, self.seed = builder, corpus, recipe, seed
        self.teacher = teacher or TeacherCache()
        self.autocast = autocast
        self.stops = stop_token_ids(builder.dec, builder.lclm.decoder)

    def split(self, name: str) -> Split:
        split = self.corpus[name]
        return split if split.num_tokens else self.corpus["train"]

    @staticmethod
    def exact(split: Split, rng: np.random.Generator, length: int) -> list[int]:
        """A window of exactly `length` tokens (documents shorter than that are skipped)."""
        for _ in range(1000):
            window = split.window(rng, length)
            if len(window) == length:
                return window
        raise ValueError(f"the corpus has no document of {length} tokens")

    def step(self, step: int, span_tokens_done: int, objective: str | None = None) -> StepData:
        """The samples of training step `step` (of `objective`, else one the recipe draws)."""
        r = self.recipe
        rng = np.random.default_rng(stable_hash(f"campaign:{self.seed}:{objective or 'train'}:{step}"))
        objective = objective or weighted_choice(rng, r.objectives)
        train = self.split("train")
        if objective in QUESTION_OBJECTIVES:
            return QUESTION_OBJECTIVES[objective](self, rng, step)
        if objective == "reconstruction_facts":
            span = r.phase(span_tokens_done).span_tokens
            return StepData(objective, [self.builder.reconstruction(self.fact_span(rng, step * 16 + j, span))
                                        for j in range(max(1, r.batch_tokens // span))], span)
        if objective == "reconstruction_long":
            count = max(1, r.batch_tokens // r.long_span)
            return StepData(objective, [self.builder.reconstruction(self.exact(train, rng, r.long_span))
                                        for _ in range(count)], r.long_span)
        if objective == "reconstruction":
            if r.reconstruction_range is not None:
                low, high = r.reconstruction_range
                lengths = [int(rng.integers(low, high + 1)) for _ in range(max(1, r.batch_tokens // high))]
                return StepData(objective, [self.builder.reconstruction(self.exact(train, rng, n)) for n in lengths])
            span = r.phase(span_tokens_done).span_tokens
            count = max(1, r.batch_tokens // span)
            return StepData(objective, [self.builder.reconstruction(self.exact(train, rng, span))
                                        for _ in range(count)],
                            span)
        sources = []
        for _ in range(max(1, r.batch_tokens // r.interleaved_tokens)):
            raw = self.exact(train, rng, r.interleaved_tokens)
            sources.append((raw, plan_spans(len(raw), rng, 0.5, r.interleaved_spans)))
        return StepData(objective, [self.builder.interleaved(raw, spans) for raw, spans in sources], sources=sources)

    # ---- question objectives --------------------------------------------------------------
    def haystack(self, rng: np.random.Generator, tokens: int, split: str = "train") -> Haystack:
        """Filler sentences of 2x `tokens` tokens from windows of 3x `tokens` corpus tokens of `split`."""
        haystack = gather_haystack(lambda: self.builder.dec.decode(self.split(split).window(rng, 3 * tokens)),
                                   self.count, tokens)
        if haystack is None or sum(haystack.tokens) < 2 * tokens:
            raise RuntimeError("the corpus gave no usable haystack text in 20 windows")
        return haystack

    def count(self, text: str) -> int:
        """Encoder tokens of a text (what a context's length is measured in)."""
        return len(self.builder.encode_text(text))

    def question(self, rng: np.random.Generator, index: int, lengths: tuple[int, ...] | None = None) -> Question:
        """Training case `index` (questions.draw), on a haystack drawn from the training split; where
        a haystack cannot hold the case (too few distinct sentences), the next draw of the index."""
        for attempt in range(8):
            kind, tokens, seed = draw(self.seed, index + attempt * 1_000_003, lengths or self.recipe.question_lengths,
                                      self.recipe.question_kinds)
            try:
                return make_question(kind, seed, self.haystack(rng, tokens), tokens, self.count)
            except ValueError:
                continue
        raise RuntimeError(f"no question case could be made for index {index} in 8 draws")

    def fact_span(self, rng: np.random.Generator, index: int, length: int) -> list[int]:
        """`length` decoder tokens of training question `index`'s document that hold its first answer
        whole, at a random place in the span (the exact digits a look-up must read back)."""
        case = self.question(rng, index)
        encoded = self.builder.dec(case.context, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        start_char = case.answer_offsets[0]
        end_char = start_char + len(case.answers[0])
        first = next(i for i, (a, b) in enumerate(offsets) if b > start_char)
        last = next((i for i, (a, b) in enumerate(offsets) if b >= end_char), len(ids) - 1)
        if len(ids) <= length:
            return ids
        low = max(0, last + 1 - length)  # the span's first token: the answer's last token inside it
        high = min(first, len(ids) - length)  # ... and its first token inside it
        begin = int(rng.integers(low, max(low, high) + 1))
        return ids[begin:begin + length]

    def profile(self, rng: np.random.Generator) -> str:
        return weighted_choice(rng, self.recipe.profiles)

    def teacher_reply(self, prompt_ids: list[int]) -> TeacherReply:
        return self.teacher.reply(self.builder.lclm.decoder, prompt_ids, self.recipe.teacher_tokens, self.stops,
                                  self.autocast)

    def per_step(self, rng: np.random.Generator, lengths: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        """(cases, their one length) of a step: as many as fill `question_tokens`."""
        length = int(rng.choice(lengths))
        return max(1, self.recipe.question_tokens // length), (length,)

    def qa_step(self, rng: np.random.Generator, step: int) -> StepData:
        """Questions over compressed documents. The target is the base decoder's own reply to the
        same question over the raw text (its distribution at each position) where that reply is
        right and ends; otherwise, and always where the recipe's `qa_target` is "reference", the
        reference answer (cross-entropy on the answer's own tokens)."""
        count, lengths = self.per_step(rng, self.recipe.question_lengths)
        samples = []
        for j in range(count):
            case = self.question(rng, step * 16 + j, lengths)
            profile = self.profile(rng)
            if self.recipe.qa_target == "reference":
                reply = self.builder.dec(case.reply, add_special_tokens=False)["input_ids"]
                samples.append(self.builder.question(case.context, case.question, reply, profile))
                continue
            taught = self.teacher_reply(self.builder.prompt_ids(PROMPT_PROFILES[profile].question(case.context,
                                                                                                  case.question)))
            text = self.builder.dec.decode(taught.ids)
            if taught.stopped and right(case, text):
                samples.append(self.builder.question(case.context, case.question, taught.ids, profile,
                                                     soft=(taught.top_ids, taught.top_logprobs)))
            else:
                reply = self.builder.dec(case.reply, add_special_tokens=False)["input_ids"]
                samples.append(self.builder.question(case.context, case.question, reply, profile))
        return StepData("qa", samples)

    def expand_step(self, rng: np.random.Generator, step: int) -> StepData:
        """EXPAND episodes over documents of 2 to 8 chunks: the first round's target expands the
        chunk(s) holding the answer, the second answers from the expanded text."""
        lengths = tuple(n for n in self.recipe.question_lengths if n > 256) or self.recipe.question_lengths
        count, lengths = self.per_step(rng, lengths)
        samples = []
        for j in range(max(1, count // 2)):
            case = self.question(rng, step * 16 + j, lengths)
            samples += self.builder.expand_rounds(case.context, case.question, case.answer_offsets, case.reply,
                                                  DEFAULT_CHUNK_TOKENS, self.profile(rng),
                                                  objective="expand")
        return StepData("expand", samples)

    def anchor_step(self, rng: np.random.Generator, step: int) -> StepData:
        """Text-only prompts, the target the base decoder's reply and distribution: questions over
        raw text of 256 or 512 tokens, and the reconstruction prompt's frame around a raw span."""
        samples = []
        length = int(rng.choice([256, 512]))
        for j in range(max(1, self.recipe.question_tokens // (2 * length))):
            if rng.random() < 0.5:
                case = self.question(rng, step * 16 + j, (length,))
                prompt = PROMPT_PROFILES[self.profile(rng)].question(case.context, case.question)
            else:
                span = self.exact(self.split("train"), rng, VALIDATION_SPAN)
                prompt = reconstruction_prompt(self.builder.dec.decode(span))
            taught = self.teacher_reply(self.builder.prompt_ids(prompt))
            samples.append(self.builder.chat("anchor", prompt, taught.ids, [], [], end=taught.stopped,
                                             soft=(taught.top_ids, taught.top_logprobs)))
        return StepData("anchor", samples)

    def validation_spans(self, length: int = VALIDATION_SPAN, count: int = VALIDATION_SPANS) -> list[list[int]]:
        """The fixed held-back spans every validation reads (the same in every call)."""
        rng = np.random.default_rng(stable_hash(f"campaign:validation:{length}"))
        return [self.exact(self.split("validation"), rng, length) for _ in range(count)]


QUESTION_OBJECTIVES = {"qa": CampaignData.qa_step, "expand": CampaignData.expand_step,
                       "anchor": CampaignData.anchor_step}


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


# ---- validation ---------------------------------------------------------------------------------
def other_span(samples: list[Sample]) -> list[int]:
    """For each reconstruction sample the next one (cyclically) whose document has as many
    latents (encoder tokenizations of equal spans may differ in length), else itself: whose
    latents it reads in the validation with other spans' latents."""
    counts = [s.regions[0][2] - s.regions[0][1] for s in samples]
    chosen = []
    for i, count in enumerate(counts):
        ring = [(i + k) % len(samples) for k in range(1, len(samples))]
        chosen.append(next((j for j in ring if counts[j] == count), i))
    return chosen


@torch.no_grad()
def validate(lclm, builder: ExampleBuilder, spans: list[list[int]], pad_id: int, free_running: int,
             autocast: bool) -> dict:
    """Teacher-forced accuracy on the span tokens (end of turn excluded), the same with every
    span given another span's latents (the gap between the two is what the latents carry; a
    trained decoder also learns the corpus, which lifts both), and free-running
    reconstruction token accuracy of the first `free_running` spans."""
    was_training = lclm.training
    lclm.eval()
    samples = [builder.reconstruction(s) for s in spans]
    others = [replace(s, documents=samples[j].documents) for s, j in zip(samples, other_span(samples))]
    correct, total = {"own": 0, "other": 0}, 0
    with torch.autocast(lclm.device.type, dtype=torch.bfloat16, enabled=autocast):
        for first in range(0, len(spans), 8):
            for which, group in (("own", samples), ("other", others)):
                logits, targets = label_logits(lclm, collate(group[first:first + 8], pad_id))
                hits = (logits.argmax(-1) == targets).view(-1, len(spans[0]) + 1)[:, :-1]  # [b, span], no end of turn
                correct[which] += int(hits.sum())
            total += hits.numel()
        scores = [token_accuracy(ids, reconstruct(lclm, lclm.encode(builder.to_encoder(ids)), len(ids) + 8))
                  for ids in spans[:free_running]]
    lclm.train(was_training)
    return {"teacher_forced": round(correct["own"] / max(total, 1), 4),
            "teacher_forced_other": round(correct["other"] / max(total, 1), 4),
            "free_running": round(float(np.mean(scores)), 4) if scores else None}


QUESTION_CASES = 12  # LCLM answers validated per call (fact, distractors and table cases of 512 tokens)
EXPAND_CASES = 6  # first EXPAND rounds validated (fact cases of 1,024 tokens: 4 chunks)
ANCHOR_CASES = 8  # text-only questions answered by the trained and the base decoder


def validation_questions(data: CampaignData) -> dict[str, list[Question]]:
    """The fixed held-back question cases (validation split, a seed space of their own)."""
    rng = np.random.default_rng(stable_hash("campaign:validation:questions"))
    kinds = ("fact", "distractors", "table")

    def case(kind: str, tokens: int, i: int) -> Question:
        return make_question(kind, stable_hash(f"campaign:validation:{kind}:{tokens}:{i}"),
                             data.haystack(rng, tokens, "validation"), tokens, data.count)

    return {"lclm": [case(kinds[i % 3], 512, i) for i in range(QUESTION_CASES)],
            "expand": [case("fact", 1024, i) for i in range(EXPAND_CASES)],
            "anchor": [case(kinds[i % 3], 256, 100 + i) for i in range(ANCHOR_CASES)]}


@torch.no_grad()
def validate_questions(lclm, data: CampaignData, cases: dict[str, list[Question]], autocast: bool,
                       max_new_tokens: int = 48) -> dict:
    """Greedy answers in the studio profile: the LCLM's from compressed documents (exact match by
    the RULER rule, and digits in place for numeric answers), the chunk the first EXPAND round
    names against the chunk holding the answer, and how often the trained decoder's reply to a
    text-only question equals the base decoder's."""
    from model.agent import parse_reply
    from model.training.data.questions import digits_in_place

    was_training = lclm.training
    lclm.eval()
    builder, stops, profile = data.builder, data.stops, PROMPT_PROFILES["studio"]

    def generate(prompt: str, regions: list[torch.Tensor], prefix: str = "", tokens: int = max_new_tokens) -> str:
        state = prefill(lclm.decoder, lclm.prepare(lclm.chat(prompt, prefix), regions).inputs_embeds)
        return builder.dec.decode(list(decode(lclm.decoder, state, tokens, stops)))

    exact, digits, replies = [], [], []
    with torch.autocast(lclm.device.type, dtype=torch.bfloat16, enabled=autocast):
        for case in cases["lclm"]:
            latents = lclm.encode(builder.encode_text(case.context))  # [M, D]
            reply = generate(profile.question(memory_region(int(latents.shape[0])), case.question), [latents])
            exact.append(right(case, reply))
            if case.answers[0].isdigit():
                digits.append(digits_in_place(case.answers[0], reply))
            replies.append(reply[:120])
        chosen = []
        for case in cases["expand"]:
            chunks = chunk_text(case.context, builder.dec, DEFAULT_CHUNK_TOKENS)
            holding = next(c.number for c in chunks if c.start_char <= case.answer_offsets[0] < c.end_char)
            latents = [lclm.encode(builder.encode_text(c.text)) for c in chunks]  # [M_i, D] each
            prompt = profile.expand_round([memory_region(int(x.shape[0])) for x in latents], {}, case.question, 4)
            reply = parse_reply(profile.first_reply_prefix + generate(prompt, latents, profile.first_reply_prefix, 8),
                                len(chunks))
            chosen.append(reply.action == "expand" and reply.numbers[:1] == [holding])
        same = []
        for case in cases["anchor"]:
            prompt_ids = builder.prompt_ids(profile.question(case.context, case.question))
            base = data.teacher.reply(lclm.decoder, prompt_ids, max_new_tokens, stops, autocast).ids
            state = prefill(lclm.decoder, lclm.decoder.get_input_embeddings()(torch.tensor([prompt_ids],
                                                                                             device=lclm.device)))
            same.append(list(decode(lclm.decoder, state, max_new_tokens, stops)) == base)
    lclm.train(was_training)
    return {"questions": round(float(np.mean(exact)), 4), "digits": round(float(np.mean(digits)), 4) if digits else 0.0,
            "expand_first": round(float(np.mean(chosen)), 4), "anchor_same": round(float(np.mean(same)), 4),
            "replies": replies[:3]}


# ---- state on disk ------------------------------------------------------------------------------
def save_state(state_dir: Path, lclm, groups, optimizer, state: dict) -> None:
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {name: p.detach().float().contiguous() for params in groups.values() for name, p in params}
    save_file(tensors, tmp / "trainable.safetensors")
    save_optimizer(optimizer, tmp / "optimizer")
    save_file({"torch": torch.get_rng_state()}, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    old = state_dir.with_name(state_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if state_dir.exists():
        state_dir.rename(old)
    tmp.rename(state_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_state(state_dir: Path, lclm, groups, optimizer) -> dict:
    tensors = load_file(state_dir / "trainable.safetensors")
    params = {name: p for ps in groups.values() for name, p in ps}
    if set(tensors) != set(params):
        raise SystemExit(f"error: {state_dir} holds other tensors than this recipe trains")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    load_optimizer(optimizer, state_dir / "optimizer")
    torch.set_rng_state(load_file(state_dir / "rng.safetensors")["torch"])
    return json.loads((state_dir / "state.json").read_text())


def plot_curve(evals: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "tokens", "tokens trained"), (axes[1], "wall_s", "wall minutes")):
        xs = [e[key] / (60 if key == "wall_s" else 1) for e in evals]
        ax.plot(xs, [e["teacher_forced"] for e in evals], marker="o", label="teacher-forced")
        other = [(x, e["teacher_forced_other"]) for x, e in zip(xs, evals) if "teacher_forced_other" in e]
        if other:
            ax.plot(*zip(*other), marker=".", ls=":", label="teacher-forced,\nother spans' latents")
        free = [(x, e["free_running"]) for x, e in zip(xs, evals) if e.get("free_running") is not None]
        if free:
            ax.plot(*zip(*free), marker="s", label="free-running")
        for key_name, name in (("questions", "questions answered"), ("digits", "digits in place"),
                               ("expand_first", "EXPAND first chunk"), ("anchor_same", "text anchor")):
            asked = [(x, e[key_name]) for x, e in zip(xs, evals) if key_name in e]
            if asked:
                ax.plot(*zip(*asked), marker="^", ls="--", lw=0.9, label=name)
        ax.axhline(evals[0]["teacher_forced"], color="grey", lw=0.8, ls="--", label="prior (step 0)")
        ax.set_xlabel(label)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("token accuracy, validation")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- the throughput probe -----------------------------------------------------------------------
PROBE_S = 20.0  # seconds the probe takes on CUDA before training (0 on a CPU: the recipe's batch)
PROBE_SCALES = (1, 2, 4, 8, 16, 32, 64)  # candidates: the recipe's batch_tokens times these
PROBE_GAIN = 1.05  # a larger batch is chosen only when it trains this much more tokens per second


def probe(lclm, data: CampaignData, groups, pad_id: int, autocast: bool, seconds: float,
          span_tokens_done: int = 0, scales: tuple[int, ...] = PROBE_SCALES) -> dict:
    """The span tokens per step that train fastest here. Each candidate batch (the recipe's span
    length, more spans a step) runs forward + backward for an equal share of `seconds` (no
    optimizer step: the weights stay as they are), growing until out of memory or until a
    larger batch is clearly slower; the smallest within PROBE_GAIN of the best wins (smaller
    batches take more optimizer steps per token)."""
    base = data.recipe
    rng = torch.get_rng_state()
    params = [p for ps in groups.values() for _, p in ps]
    cuda = lclm.device.type == "cuda"
    share = seconds / len(scales)
    rates: dict[int, float] = {}
    stopped = "all candidates"
    for scale in scales:
        tokens = base.batch_tokens * scale
        data.recipe = replace(base, batch_tokens=tokens)
        done, elapsed, step = 0, 0.0, 0
        try:
            while elapsed < share or step < 2:
                batch = data.step(step, span_tokens_done)
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.autocast(lclm.device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss, _, _ = step_loss(lclm, batch, pad_id)
                loss.backward()
                if cuda:
                    torch.cuda.synchronize()
                if step > 0:  # a shape's first step warms kernels and the allocator
                    elapsed += time.perf_counter() - t0
                    done += sum(s.tokens for s in batch.samples)
                step += 1
                for p in params:
                    p.grad = None
        except torch.OutOfMemoryError:
            stopped = f"out of memory at {tokens}"
            break
        finally:
            for p in params:
                p.grad = None
            if cuda:
                torch.cuda.empty_cache()
        rates[tokens] = round(done / max(elapsed, 1e-9), 1)
        if rates[tokens] * PROBE_GAIN < max(rates.values()):
            stopped = f"slower at {tokens}"
            break
    data.recipe = base
    torch.set_rng_state(rng)
    if not rates:
        raise SystemExit(f"error: the probe ran out of memory at the recipe's own batch of {base.batch_tokens} tokens")
    best = max(rates.values())
    chosen = min(t for t, r in rates.items() if r * PROBE_GAIN >= best)
    return {"batch_tokens": chosen, "tokens_per_s": rates, "stopped": stopped, "seconds": seconds}


# ---- the campaign -------------------------------------------------------------------------------
def load_for_training(run: RunConfig, recipe: Recipe, checkpoint: Path | None):
    """(LCLM on the fastest device, the recipe's trainable groups, whether bf16 autocast is on):
    the run's LCLM from `checkpoint` (None: fresh), set up as training and validation use it."""
    lclm = build_trainable(run, init_from=checkpoint)
    for model in (lclm.decoder, lclm.encoder.model):
        # short training sequences: matmul attention beats the fused CPU kernel in bf16 several times
        model.set_attn_implementation("eager")
    if not recipe.train_decoder and checkpoint is None:
        set_decoder_lora(lclm.decoder, False)  # freshly initialised LoRA is the identity: skip its compute
    groups = trainable_groups(lclm, recipe)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lclm.to(device)
    use_bf16 = recipe.precision == "auto" and fast_dtype(device) == torch.bfloat16
    if use_bf16:
        freeze_to(lclm, torch.bfloat16)
    return lclm, groups, use_bf16


def campaign(variant: str, recipe: Recipe, minutes: float, state_dir: Path, out: Path, corpus: str | None = None,
             init_from: Path | None = None, eval_minutes: float = 5.0, seed: int = 0, quiet: bool = False,
             run: RunConfig | None = None, free_running: int = FREE_RUNNING_SPANS,
             validation_span: int = VALIDATION_SPAN, lr_scale: float = 1.0, probe_s: float | None = None) -> dict:
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    box_s = minutes * 60
    run = run or run_config(variant, recipe, corpus)
    resuming = (state_dir / "state.json").is_file()
    # a returned state (state.json beside OUT/final/, no tensors): the trained tensors come from
    # final/ (bf16) and the optimizer starts again (its moments are too large to bring back)
    returned = resuming and not (state_dir / "trainable.safetensors").is_file()
    if returned and not (out / "final").is_dir():
        raise SystemExit(f"error: {state_dir} holds no tensors and {out / 'final'} is missing")
    if resuming:  # the checkpoint the state started from holds what this recipe does not train
        started_from = json.loads((state_dir / "state.json").read_text()).get("init_from")
        init_from = Path(started_from) if started_from else None
    lclm, groups, use_bf16 = load_for_training(run, recipe, out / "final" if returned else init_from)
    device = lclm.device
    optimizer = torch.optim.AdamW([{"params": [p for _, p in ps], "lr": recipe.lr[g], "name": g}
                                   for g, ps in groups.items()], weight_decay=0.0)
    builder = ExampleBuilder(lclm)
    teacher = TeacherCache(state_dir.with_name(state_dir.name + ".teacher.jsonl"))
    data = CampaignData(builder, load_corpus(run.corpus), recipe, seed, teacher, use_bf16)
    asks = any(name in QUESTION_OBJECTIVES for name in recipe.objectives)
    questions = validation_questions(data) if asks else None
    pad_id = lclm.decoder_tokenizer.pad_token_id or 0
    state = {"variant": variant, "recipe": asdict(recipe), "step": 0, "tokens": {}, "span_tokens": 0,
             "cpu_s": 0.0, "wall_s": 0.0, "evals": [], "precision": "bf16" if use_bf16 else "fp32",
             "calls": 0, "init_from": str(init_from) if init_from else None}
    if resuming:
        if returned:
            saved = json.loads((state_dir / "state.json").read_text())
            state["optimizer_restarts"] = saved.get("optimizer_restarts", 0) + 1
        else:
            saved = load_state(state_dir, lclm, groups, optimizer)
            state["optimizer_restarts"] = saved.get("optimizer_restarts", 0)
        if saved["variant"] != variant or saved["recipe"]["name"] != recipe.name:
            raise SystemExit(f"error: {state_dir} belongs to {saved['recipe']['name']} on {saved['variant']}")
        state.update({k: saved[k] for k in ("step", "tokens", "span_tokens", "cpu_s", "wall_s", "evals", "calls",
                                            "init_from")})
        state["lr_scales"] = saved.get("lr_scales", [1.0] * saved["calls"])
        if "warm_start" in saved:
            state["warm_start"] = saved["warm_start"]
    state["calls"] += 1
    state.setdefault("lr_scales", []).append(lr_scale)  # one per call: a campaign anneals by lowering it
    validation = data.validation_spans(validation_span)
    say = (lambda m: None) if quiet else tqdm.write
    base_cpu, base_wall = state["cpu_s"], state["wall_s"]
    if probe_s is None:
        probe_s = PROBE_S if device.type == "cuda" else 0.0
    if probe_s > 0:
        state["probe"] = probe(lclm, data, groups, pad_id, use_bf16, probe_s, state["span_tokens"])
        recipe = replace(recipe, batch_tokens=state["probe"]["batch_tokens"])
        data.recipe = recipe
        say(f"probe: {recipe.batch_tokens} span tokens a step; tokens/s by batch: {state['probe']['tokens_per_s']}")

    def clocks() -> tuple[float, float]:
        return (base_cpu + time.process_time() - started_cpu, base_wall + time.perf_counter() - started_wall)

    def evaluate(free: int = 0) -> None:
        result = validate(lclm, builder, validation, pad_id, free, use_bf16)
        if questions is not None:
            result.update(validate_questions(lclm, data, questions, use_bf16))
        cpu, wall = clocks()
        entry = {"step": state["step"], "tokens": sum(state["tokens"].values()), "cpu_s": round(cpu, 1),
                 "wall_s": round(wall, 1), **result}
        state["evals"].append(entry)
        say(f"validation at step {entry['step']} ({entry['tokens']:,} tokens, {wall / 60:.1f} min): "
            f"teacher-forced {result['teacher_forced']:.3f} (other spans' latents "
            f"{result['teacher_forced_other']:.3f}), free-running {result['free_running']}"
            + (f"; questions {result['questions']:.3f} (digits {result['digits']:.3f}), EXPAND first "
               f"{result['expand_first']:.3f}, text anchor {result['anchor_same']:.3f}" if questions else ""))

    lclm.train()
    if not state["evals"]:
        evaluate(free_running)  # step 0: the prior
        if recipe.warm_start_steps and init_from is None:
            state["warm_start"] = warm_start(lclm, data, groups, recipe.warm_start_steps, use_bf16, say,
                                             recipe.warm_target, until=started_wall + box_s / 2)
            state["tokens"]["warm_start"] = state["warm_start"]["tokens"]
            evaluate(free_running)
    last_eval = time.perf_counter()
    bar = tqdm(total=int(box_s), unit="s", desc=f"{variant} {recipe.name}", disable=quiet,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f}s [{elapsed}<{remaining}] {postfix}")
    step_s, reason = 0.0, "box"
    with StopRequested() as stop:
        while True:
            elapsed = time.perf_counter() - started_wall
            if elapsed + step_s + min(SAVE_MARGIN_S, 0.2 * box_s) > box_s:
                break
            if stop.requested:
                reason = "interrupted"
                break
            t0 = time.perf_counter()
            step = state["step"]
            factor = min(1.0, (step + 1) / recipe.warmup_steps) * lr_scale
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr[group["name"]] * factor
            batch = data.step(step, state["span_tokens"])
            objective, samples, span = batch.objective, batch.samples, batch.span_tokens
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss, correct, count = step_loss(lclm, batch, pad_id)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for ps in groups.values() for _, p in ps], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["tokens"][objective] = state["tokens"].get(objective, 0) + sum(s.tokens for s in samples)
            if objective == "reconstruction":
                state["span_tokens"] += sum(len(s.documents[0]) for s in samples)
            step_s = 0.8 * step_s + 0.2 * (time.perf_counter() - t0) if step_s else time.perf_counter() - t0
            total = sum(state["tokens"].values())
            bar.n = min(int(time.perf_counter() - started_wall), int(box_s))
            bar.set_postfix_str(f"step {state['step']} {objective[:5]} loss {float(loss.detach()):.3f} "
                                f"acc {correct / max(count, 1):.2f} span {span} tok {total:,}")
            if time.perf_counter() - last_eval > eval_minutes * 60:
                evaluate()
                last_eval = time.perf_counter()
    bar.close()
    if state["evals"][-1]["step"] != state["step"] or state["evals"][-1]["free_running"] is None:
        evaluate(free_running)  # free-running reconstruction at the end of each call
    state["cpu_s"], state["wall_s"] = (round(v, 1) for v in clocks())
    save_state(state_dir, lclm, groups, optimizer, state)
    write_outputs(lclm, out, state, run)
    say(f"{reason}: step {state['step']}, {sum(state['tokens'].values()):,} tokens; state in {state_dir}, "
        f"final/ in {out}; run the same command to continue")
    return state


def validate_checkpoint(run: RunConfig, checkpoint: Path | None, recipe: Recipe) -> dict:
    """The campaign's validation of a published-layout checkpoint (None: the run's untrained LCLM)."""
    lclm, _, use_bf16 = load_for_training(run, recipe, checkpoint)
    builder = ExampleBuilder(lclm)
    data = CampaignData(builder, load_corpus(run.corpus), recipe, 0)
    result = validate(lclm, builder, data.validation_spans(), lclm.decoder_tokenizer.pad_token_id or 0,
                      FREE_RUNNING_SPANS, use_bf16)
    return {"run": run.name, "checkpoint": str(checkpoint) if checkpoint else None,
            "precision": "bf16" if use_bf16 else "fp32", "cpu": cpu_name(), **result}


def write_outputs(lclm, out: Path, state: dict, run: RunConfig) -> None:
    """final/ (bfloat16, published layout), metrics.json and curve.png."""
    out.mkdir(parents=True, exist_ok=True)
    final = out / "final"
    tmp = out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(lclm, tmp, dtype=torch.bfloat16)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    metrics = {k: state.get(k) for k in ("variant", "recipe", "step", "tokens", "span_tokens", "cpu_s", "wall_s",
                                         "precision", "calls", "lr_scales", "init_from", "probe", "optimizer_restarts",
                                         "warm_start", "evals")}
    metrics["device"] = device_name(lclm.device)
    metrics["cpu"] = cpu_name()
    metrics["threads"] = torch.get_num_threads()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    try:
        import matplotlib  # noqa: F401  (not on every GPU machine; the curve can be drawn later from metrics.json)
    except ImportError:
        return
    plot_curve(state["evals"], out / "curve.png",
               f"{state['variant']} {state['recipe']['name']} ({state['precision']}, {device_name(lclm.device)})")


def model_card(state: dict, run: RunConfig) -> dict:
    """What a shipped variant says about itself: how, on what and how long it was trained, and
    its validation results beside the untrained start."""
    first, last = state["evals"][0], state["evals"][-1]
    return {"variant": state["variant"], "run": run.name, "trained": True, "encoder": run.encoder,
            "decoder": run.decoder, "recipe": state["recipe"], "tokens_per_objective": state["tokens"],
            "steps": state["step"], "cpu_hours": round(state["cpu_s"] / 3600, 3),
            "wall_hours": round(state["wall_s"] / 3600, 3), "cpu": cpu_name(), "precision": state["precision"],
            "campaign_calls": state["calls"], "lr_scales": state.get("lr_scales"), "init_from": state["init_from"],
            "validation": {"spans": f"{VALIDATION_SPANS} held-back {VALIDATION_SPAN}-token spans (teacher-forced), "
                                    f"{FREE_RUNNING_SPANS} of them free-running",
                           "untrained": {k: first[k] for k in CARD_MEASURES if k in first},
                           "trained": {k: last[k] for k in CARD_MEASURES if k in last}}}


CARD_MEASURES = ("teacher_forced", "free_running", "questions", "digits", "expand_first", "anchor_same")
RECONSTRUCTION_KEPT = 0.05  # free-running reconstruction a question recipe may lose against the shipped variant


def improves(now: dict, start: dict, shipped: dict | None) -> bool:
    """Whether validation results `now` earn publishing over the untrained start and the variant
    shipped (None: none). Reconstruction recipes: better teacher-forced and free-running
    reconstruction than the start, and teacher-forced than the shipped. Question recipes (`now`
    holds `questions`): more questions answered than the start and the shipped variant, with
    free-running reconstruction within RECONSTRUCTION_KEPT of the start's. A question campaign
    starts from the shipped weights (--init-from), so its start is the shipped variant measured by
    the same validation in the same precision; a card's older figures may come from another."""
    if "questions" in now:
        best = max(start.get("questions", 0.0), (shipped or {}).get("questions", 0.0))
        kept = (now["free_running"] or 0) >= (start["free_running"] or 0) - RECONSTRUCTION_KEPT
        return now["questions"] > best and kept
    if not (now["teacher_forced"] > start["teacher_forced"]
            and (now["free_running"] or 0) > (start["free_running"] or 0)):
        return False
    return shipped is None or now["teacher_forced"] > shipped["teacher_forced"]


def publish(out: Path, state: dict, run: RunConfig, target: Path) -> bool:
    """Copy OUT/final/ to `target` with a model card when its validation `improves` on its
    untrained start and the variant already there (if any)."""
    card = model_card(state, run)
    now, start = card["validation"]["trained"], card["validation"]["untrained"]
    shipped = target / "model_card.json"
    before = json.loads(shipped.read_text())["validation"]["trained"] if shipped.is_file() else None
    if not improves(now, start, before):
        return False
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(out / "final", tmp)
    (tmp / "model_card.json").write_text(json.dumps(card, indent=1) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return True


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def cpu_name() -> str:
    """The CPU and its core count, as training results name it."""
    return f"{precision.cpu_name()}, {os.cpu_count()} cores"


# ---- what a GPU machine brings back ---------------------------------------------------------------
PART_BYTES = 15 * 2**20  # one returned file: under the 16 MiB limit
RETURN_FILES, RETURN_BYTES, RETURN_FILE_BYTES = 8, 64 * 2**20, 16 * 2**20


def pack(variant: str, state_dir: Path, out: Path, dest: Path) -> list[Path]:
    """One variant's OUT/ (final/ in bf16, metrics.json, curve.png) and STATE/state.json as one tar
    in parts of at most PART_BYTES: DEST/<variant>.tar.0, .1, ... The tensors of STATE/ and the
    optimizer moments stay behind (fp32, several times final/); `unpack` and a later call continue
    from final/ with a fresh optimizer."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob(f"{variant}.tar.*"):
        old.unlink()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(state_dir / "state.json", arcname="state/state.json")
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            tar.add(path, arcname=f"out/{path.relative_to(out).as_posix()}")
    data = buffer.getvalue()
    parts = []
    for index, at in enumerate(range(0, len(data), PART_BYTES)):
        parts.append(dest / f"{variant}.tar.{index}")
        parts[-1].write_bytes(data[at:at + PART_BYTES])
    return parts


def unpack(variant: str, source: Path, state_dir: Path, out: Path) -> bool:
    """Restore a packed variant into STATE/ and OUT/ when it has trained more steps than the state
    already there (or there is none); True when it did."""
    parts = sorted(source.glob(f"{variant}.tar.*"), key=lambda p: int(p.suffix[1:]))
    if not parts:
        return False
    tar = tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts)))
    with tar:
        packed = json.loads(tar.extractfile("state/state.json").read())
        here = state_dir / "state.json"
        if here.is_file() and json.loads(here.read_text())["step"] >= packed["step"]:
            return False
        tmp = state_dir.with_name(state_dir.name + ".unpack")
        shutil.rmtree(tmp, ignore_errors=True)
        tar.extractall(tmp, filter="data")
    shutil.rmtree(state_dir, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    (tmp / "state").rename(state_dir)
    (tmp / "out").rename(out)
    shutil.rmtree(tmp)
    return True


def return_problems(dest: Path) -> list[str]:
    """What under DEST would not come back from the GPU machine (count, size per file, total)."""
    files = [p for p in dest.rglob("*") if p.is_file()]
    problems = [f"{p.name}: {p.stat().st_size / 2**20:.1f} MiB" for p in files if p.stat().st_size > RETURN_FILE_BYTES]
    if len(files) > RETURN_FILES:
        problems.append(f"{len(files)} files (at most {RETURN_FILES})")
    if (total := sum(p.stat().st_size for p in files)) > RETURN_BYTES:
        problems.append(f"{total / 2**20:.1f} MiB in all (at most {RETURN_BYTES // 2**20})")
    return problems


def folders(args, variant: str) -> tuple[Path, Path]:
    """STATE/ and OUT/ of one variant: the given folders, or a sub-folder each under --variants."""
    if args.variants is None:
        return args.state, args.out
    return args.state / variant, args.out / variant


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.training.campaign", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="cs4-concat", choices=sorted(VARIANTS))
    parser.add_argument("--smoke", action="store_true",
                        help="the smoke run's tiny random pair and corpus (made under STATE/../smoke-data)")
    parser.add_argument("--recipe", default=next(iter(RECIPES)), choices=list(RECIPES))
    parser.add_argument("--variants", help="comma-separated variants trained in this order within --minutes (each "
                        "gets an equal share of what is left), under STATE/<variant> and OUT/<variant>; with --smoke "
                        "any names, each a copy of the smoke run")
    parser.add_argument("--minutes", type=float, help="wall-clock box of this call (all variants together)")
    parser.add_argument("--probe-s", type=float,
                        help=f"seconds of the throughput probe that picks the batch (default {PROBE_S:g} on CUDA, "
                             "none on a CPU: the recipe's batch)")
    parser.add_argument("--pack", type=Path, help="after each variant, write its OUT/ and state.json here as "
                        "<variant>.tar.N parts of at most 15 MiB (what a GPU machine can bring back)")
    parser.add_argument("--returned", type=Path,
                        help="first unpack <variant>.tar.N parts from here into STATE/ and OUT/ (a later call "
                             "continues from what an earlier one brought back)")
    parser.add_argument("--publish-only", action="store_true", help="train nothing: unpack --returned and --publish")
    parser.add_argument("--validate-only", action="store_true",
                        help="train nothing: print the validation of --init-from (or of the untrained variant) as JSON")
    parser.add_argument("--state", type=Path, help="resumable state directory (required unless --validate-only)")
    parser.add_argument("--out", type=Path, help="final/, metrics.json and curve.png (required unless --validate-only)")
    parser.add_argument("--corpus", help="shard directory or packed corpus (default: the variant's config)")
    parser.add_argument("--init-from", type=Path, help="start a new state from this published-layout checkpoint")
    parser.add_argument("--eval-minutes", type=float, default=5.0, help="validation every so many minutes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr-scale", type=float, default=1.0,
                        help="multiply the recipe's learning rates in this call (below 1 to anneal a long campaign)")
    parser.add_argument("--threads", type=int, help="torch threads (default: every core; 1 beside other work)")
    parser.add_argument("--publish", action="store_true",
                        help="copy final/ to the variant's model/weights/ folder when it beats its untrained start "
                             "and the variant shipped there")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.validate_only and (args.state is None or args.out is None):
        parser.error("--state and --out are required")
    if args.smoke and args.state is None:
        parser.error("--smoke needs --state (its tiny pair and corpus are made beside it)")
    if args.publish_only:
        args.publish = True
    elif not args.validate_only and (args.minutes is None or args.minutes <= 0):
        parser.error("--minutes must be given and positive")
    if args.lr_scale <= 0:
        parser.error("--lr-scale must be positive")
    variants = [args.variant] if args.variants is None else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS and not args.smoke]
    if unknown or not variants:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    smoke = None
    if args.smoke:
        from model.training.smoke import smoke_run

        smoke = smoke_run(args.state.resolve().parent)
    if args.variants is None and args.smoke:
        variants = ["smoke"]
    if args.validate_only:
        run = smoke or run_config(args.variant, RECIPES[args.recipe], args.corpus)
        print(json.dumps(validate_checkpoint(run, args.init_from, RECIPES[args.recipe])))
        return 0
    recipe = RECIPES[args.recipe]
    deadline = time.perf_counter() + 60 * (args.minutes or 0)
    for index, variant in enumerate(variants):
        state_dir, out = folders(args, variant)
        if args.returned and unpack(variant, args.returned, state_dir, out):
            print(f"{variant}: continuing from {args.returned}")
        if args.publish_only:
            state = json.loads((state_dir / "state.json").read_text())
        else:
            box = (deadline - time.perf_counter()) / (len(variants) - index)
            packed = [p for p in args.pack.rglob("*") if p.is_file()] if args.pack and args.pack.is_dir() else []
            largest = max((sum(p.stat().st_size for p in packed if p.name.startswith(v + ".tar."))
                           for v in variants[:index]), default=0)  # the next pack: as large as the largest so far
            if len(packed) + math.ceil(largest / PART_BYTES) > RETURN_FILES or \
                    sum(p.stat().st_size for p in packed) + largest > RETURN_BYTES:
                print(f"not trained: {', '.join(variants[index:])} (their packs would pass the return limits)")
                break
            if box < 5:
                print(f"not trained: {', '.join(variants[index:])} (no time left in the box)")
                break
            state = campaign(variant, recipe, box / 60, state_dir, out, args.corpus, args.init_from,
                             args.eval_minutes, args.seed, args.quiet, run=smoke, lr_scale=args.lr_scale,
                             probe_s=args.probe_s)
            if args.pack:
                parts = pack(variant, state_dir, out, args.pack)
                print(f"{variant}: packed {sum(p.stat().st_size for p in parts) / 2**20:.1f} MiB in {len(parts)} "
                      f"part(s) under {args.pack}")
        if args.publish:
            run = smoke or run_config(variant, recipe, args.corpus)
            if run.publish_to is None:
                parser.error("this run has no publish_to folder")
            target = Path(run.publish_to)
            target = target if target.is_absolute() else Path(__file__).resolve().parents[2] / target
            shipped = publish(out, state, run, target)
            print(f"published to {target}" if shipped else f"not published: final/ does not improve on {target} "
                  "or on its untrained start")
    if args.pack and (problems := return_problems(args.pack)):
        print(f"error: {args.pack} would not all come back: {'; '.join(problems)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
