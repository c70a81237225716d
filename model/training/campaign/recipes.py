"""What a campaign trains: its recipes (Phase, Recipe, RECIPES), the variants (VARIANTS) and
their run settings under a recipe (`run_config`), and the validation's sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from model.config import RATIOS
from model.training.config import RunConfig

VALIDATION_SPAN = 64  # tokens per validation span (16 latents at 1:4)
VALIDATION_SPANS = 32  # teacher-forced
FREE_RUNNING_SPANS = 4  # greedy reconstruction, at the start and end of each call


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
    Recipe("answer-single", "answer-digits narrowed to the single look-up (a fact alone, or among distractors) with "
           "half its steps on questions: more answer tokens on the kind whose digits come back permuted inside a "
           "latent's group, and the reconstruction of the values' own spans beside them",
           phases=(Phase(64),), objectives={"qa": 0.5, "reconstruction_facts": 0.3, "reconstruction": 0.12,
                                            "anchor": 0.08},
           question_lengths=(256, 512), qa_target="reference",
           question_kinds={"fact": 0.7, "distractors": 0.3}, train_decoder=True,
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


def run_config(variant: str, recipe: Recipe, corpus: str | None) -> RunConfig:
    if variant not in VARIANTS:
        raise SystemExit(f"error: unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    run = RunConfig.load(VARIANTS[variant])
    return replace(run, lora=replace(run.lora, r=recipe.encoder_lora_r, alpha=2 * recipe.encoder_lora_r),
                   decoder_lora=replace(run.lora, r=recipe.decoder_lora_r, alpha=2 * recipe.decoder_lora_r),
                   **({"corpus": corpus} if corpus else {}))
