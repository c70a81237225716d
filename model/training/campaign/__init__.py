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

# The parts, each importing only those above it:
#   recipes.py      Phase, Recipe, RECIPES, VARIANTS, run_config; the validation's sizes
#   data.py         StepData, CampaignData (a step's samples of each objective), QUESTION_OBJECTIVES
#   objectives.py   the trainable groups (trainable_groups, set_decoder_lora, freeze_to), the losses
#                   (label_logits, teacher_logits, step_loss, mixed_loss) and warm_start
#   validation.py   validate (reconstruction), validation_questions and validate_questions
#   state.py        STATE/ and OUT/ on disk, plot_curve, the model card, improves and publish; cpu_name
#   transfer.py     pack, unpack, return_problems: what a lent GPU machine brings back
#   loop.py         load_for_training, probe, campaign, validate_checkpoint
#   __main__.py     the command line (main), whose --help is this docstring

# The names other code imports from the package. The parts look each other's names up in their own
# modules: a test that patches one patches it there (e.g. campaign.loop.step_loss for probe).
from model.training.campaign.data import CampaignData
from model.training.campaign.loop import probe
from model.training.campaign.objectives import (
    embedding_targets,
    freeze_to,
    mixed_loss,
    set_decoder_lora,
    step_loss,
    teacher_logits,
    trainable_groups,
    warm_start,
)
from model.training.campaign.recipes import RECIPES, VARIANTS, Phase, Recipe
from model.training.campaign.state import cpu_name, improves, publish
from model.training.campaign.transfer import pack, return_problems, unpack
from model.training.campaign.validation import validate

__all__ = [
    "RECIPES", "VARIANTS", "Phase", "Recipe",
    "CampaignData",
    "embedding_targets", "freeze_to", "mixed_loss", "set_decoder_lora", "step_loss", "teacher_logits",
    "trainable_groups", "warm_start",
    "validate",
    "cpu_name", "improves", "publish",
    "pack", "return_problems", "unpack",
    "probe",
]
