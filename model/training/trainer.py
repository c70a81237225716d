"""The training loop: the stages of a run in order, each resuming from the previous
stage's checkpoint, with accelerate (one process on CPU or one GPU, or many processes
under `accelerate launch`, DDP or FSDP), bf16 autocast and gradient checkpointing on GPU,
tqdm progress with tokens/s and ETA, checkpoints every `save_every` steps and on
interruption (SIGINT/SIGTERM), and automatic resume.

Output directory of a run:
    run.json                         the resolved run settings
    stage<k>-<name>/checkpoint_<s>/  published layout + trainer_state.json + optimizer-rank<r>.*
    stage<k>-<name>/log.jsonl        one line per logged step: loss per objective, lr, tokens/s
    stage<k>-<name>/done.json        written when the stage is complete (validation losses)
    final/                           the last stage's weights in the published layout (load_lclm reads it)
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.precision import fast_dtype
from model.training.config import RunConfig, StageConfig
from model.training.data.corpus import stable_hash
from model.training.data.shards import Corpus, load_corpus
from model.training.examples import OBJECTIVES, ExampleBuilder, collate
from model.training.modeling import (
    LCLMForTraining,
    build_trainable,
    enable_gradient_checkpointing,
    load_optimizer,
    lora_flags,
    save_checkpoint,
    save_optimizer,
)
from model.training.stages import apply_stage

SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class StopRequested:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and stops."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class LossMeter:
    """Mean loss per objective since the last report, and an overall moving average."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    ema: dict[str, float] = field(default_factory=dict)

    def add(self, objective: str, loss: float) -> None:
        self.sums[objective] = self.sums.get(objective, 0.0) + loss
        self.counts[objective] = self.counts.get(objective, 0) + 1
        self.ema[objective] = loss if objective not in self.ema else 0.9 * self.ema[objective] + 0.1 * loss

    def report(self) -> dict[str, float]:
        out = {k: round(self.sums[k] / self.counts[k], 4) for k in sorted(self.sums)}
        self.sums, self.counts = {}, {}
        return out


def schedule(stage: StageConfig):
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""

    def factor(step: int) -> float:
        if step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        progress = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def checkpoints(stage_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a stage (published layout + trainer state), oldest first."""
    found = []
    for sub in stage_dir.glob("checkpoint_*"):
        match = re.fullmatch(r"checkpoint_(\d+)", sub.name)
        if match and (sub / "trainer_state.json").is_file():
            found.append((int(match.group(1)), sub))
    return sorted(found)


class Trainer:
    def __init__(self, run: RunConfig, out: str | Path, data_dir: Path | None = None, quiet: bool = False):
        from accelerate import Accelerator

        self.run = run
        self.out = Path(out)
        self.data_dir = data_dir
        self.quiet = quiet
        device = "cuda" if torch.cuda.is_available() else "cpu"
        auto = "bf16" if fast_dtype(device) == torch.bfloat16 else "fp32"  # by what the device computes fast
        precision = run.precision if run.precision != "auto" else auto
        self.accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no")
        self.precision = precision
        self._corpus: Corpus | None = None

    @property
    def corpus(self) -> Corpus:
        if self._corpus is None:
            self._corpus = load_corpus(self.run.corpus)
        return self._corpus

    def say(self, message: str) -> None:
        if self.accelerator.is_main_process and not self.quiet:
            tqdm.write(message)

    # ---- the whole run --------------------------------------------------------------------
    def train(self, stages: list[int] | None = None, init_from: str | Path | None = None) -> str:
        """Run the stages (all by default) in order. Returns "done" or "interrupted"."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:
            (self.out / "run.json").write_text(json.dumps({"name": self.run.name, **self.run.to_dict()}, indent=2))
        previous = Path(init_from) if init_from else None
        with StopRequested() as stop:
            for stage in self.run.stages:
                stage_dir = self.out / stage.name
                if stages is not None and stage.stage not in stages:
                    if checkpoints(stage_dir):
                        previous = checkpoints(stage_dir)[-1][1]
                    continue
                if (stage_dir / "done.json").is_file():
                    self.say(f"{stage.name}: already done, skipped")
                    previous = checkpoints(stage_dir)[-1][1]
                    continue
                result = self.train_stage(stage, stage_dir, previous, stop)
                if result is None:
                    return "interrupted"
                previous = result
        if previous is not None and (stages is None or self.run.stages[-1].stage in stages):
            self.publish_final(previous)
        return "done"

    def publish_final(self, checkpoint: Path) -> Path:
        """The last checkpoint's weights, without optimizer state, in `final/` (save dtype applied)."""
        final = self.out / "final"
        if self.accelerator.is_main_process:
            lclm = build_trainable(self.run, checkpoint, self.data_dir)
            shutil.rmtree(final, ignore_errors=True)
            save_checkpoint(lclm, final, dtype=SAVE_DTYPES[self.run.save_dtype])
            self.say(f"final checkpoint: {final}")
        self.accelerator.wait_for_everyone()
        return final

    # ---- one stage --------------------------------------------------------------------------
    def train_stage(self, stage: StageConfig, stage_dir: Path, previous: Path | None,
                    stop: StopRequested) -> Path | None:
        """Train one stage; returns its last checkpoint, or None when interrupted (after saving)."""
        acc, run = self.accelerator, self.run
        stage_dir.mkdir(parents=True, exist_ok=True)
        existing = checkpoints(stage_dir)
        resume = existing[-1][1] if existing else None
        start_step = json.loads((resume / "trainer_state.json").read_text())["step"] if resume else 0
        if stage.stage > run.stages[0].stage and previous is None and resume is None:
            raise ValueError(f"{stage.name} needs the previous stage's checkpoint: run it first or pass --init")
        lclm = build_trainable(run, resume or previous, self.data_dir)
        self.say(f"{stage.name}: {'resuming at step ' + str(start_step) if resume else 'starting'} "
                 f"from {resume or previous or 'the base models'}")
        trained = apply_stage(lclm, stage.stage, lora_flags(run))
        counts = {g: sum(p.numel() for p in ps) for g, ps in trained.items()}
        self.say(f"{stage.name}: training {', '.join(f'{g} ({n:,} parameters)' for g, n in counts.items())}")
        if run.gradient_checkpointing and acc.device.type == "cuda":
            enable_gradient_checkpointing(lclm)
        lclm.train()
        builder = ExampleBuilder(lclm)
        self.corpus.check_tokenizer(lclm.decoder_tokenizer)
        groups = [{"params": ps, "lr": stage.lr[g], "name": g} for g, ps in trained.items()]
        optimizer = torch.optim.AdamW(groups, weight_decay=stage.weight_decay, betas=(0.9, 0.95))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(stage))
        model, optimizer = acc.prepare(LCLMForTraining(lclm), optimizer)
        if resume:
            load_optimizer(optimizer, resume / f"optimizer-rank{acc.process_index}")
            scheduler.last_epoch = start_step  # and the learning rates of step `start_step`:
            for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
                group["lr"] = group["initial_lr"] * factor(start_step)
        meter = LossMeter()
        pad_id = lclm.decoder_tokenizer.pad_token_id
        pad_id = pad_id if pad_id is not None else builder.end_of_turn
        bar = tqdm(total=stage.steps, initial=start_step, desc=stage.name, unit="step", dynamic_ncols=True,
                   disable=not acc.is_main_process or self.quiet)
        started, tokens_done = time.perf_counter(), 0
        log = (stage_dir / "log.jsonl").open("a") if acc.is_main_process else None
        for step in range(start_step, stage.steps):
            for micro in range(stage.grad_accum):
                objective, samples = self.draw(builder, stage, step, micro, acc.process_index, "train")
                batch = collate(samples, pad_id)
                sync = contextlib.nullcontext() if micro == stage.grad_accum - 1 else acc.no_sync(model)
                with sync:
                    with acc.autocast():
                        loss = model(batch.input_ids.to(acc.device), batch.attention_mask.to(acc.device),
                                     batch.labels.to(acc.device), batch.documents, batch.regions)
                    acc.backward(loss / stage.grad_accum)
                meter.add(objective, float(loss.detach()))
                tokens_done += batch.tokens * acc.num_processes
            acc.clip_grad_norm_(model.parameters(), stage.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started
            rate = tokens_done / max(elapsed, 1e-9)
            bar.update(1)
            bar.set_postfix({**{k[:5]: f"{v:.3f}" for k, v in meter.ema.items()}, "tok/s": f"{rate:,.0f}"})
            done = step + 1
            if log is not None and (done % run.log_every == 0 or done == stage.steps):
                lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
                log.write(json.dumps({"step": done, "loss": meter.report(), "lr": lrs, "tokens_per_s": round(rate),
                                      "elapsed_s": round(elapsed, 1)}) + "\n")
                log.flush()
            interrupted = stop.requested
            if done % run.save_every == 0 or done == stage.steps or interrupted:
                self.save(model, optimizer, stage_dir, done)
            if interrupted:
                bar.close()
                self.say(f"{stage.name}: interrupted; saved checkpoint_{done}; run the same command again to resume")
                return None
        bar.close()
        if log is not None:
            log.close()
        losses = self.validate(model, builder, stage, pad_id)
        if acc.is_main_process:
            (stage_dir / "done.json").write_text(json.dumps({"steps": stage.steps, "validation_loss": losses},
                                                            indent=2))
            self.say(f"{stage.name}: done; validation loss {losses}")
        acc.wait_for_everyone()
        return checkpoints(stage_dir)[-1][1]

    def draw(self, builder: ExampleBuilder, stage: StageConfig, step: int, micro: int, rank: int, split: str):
        """The micro-batch of (stage, step, micro, rank): its objective drawn by weight, its
        samples from the split. A pure function of these numbers, so a resumed run sees the same data."""
        rng = np.random.default_rng(stable_hash(f"{split}:{self.run.seed}:{stage.stage}:{step}:{micro}:{rank}"))
        names = sorted(stage.objectives)
        weights = np.array([stage.objectives[n] for n in names], dtype=float)
        objective = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        corpus_split = self.corpus[split] if self.corpus[split].num_tokens else self.corpus["train"]
        make = OBJECTIVES[objective]()
        samples = []
        while len(samples) < stage.batch_size:
            samples += make.sample(builder, lambda n: corpus_split.window(rng, n), rng, self.run)
        return objective, samples[: stage.batch_size]

    @torch.no_grad()
    def validate(self, model, builder: ExampleBuilder, stage: StageConfig, pad_id: int) -> dict[str, float]:
        """Mean loss per objective on `eval_batches` fixed validation micro-batches per objective."""
        acc = self.accelerator
        model.eval()
        losses = {}
        for objective in sorted(stage.objectives):
            single = StageConfig(stage=stage.stage, steps=1, lr=stage.lr, objectives={objective: 1.0},
                                 batch_size=stage.batch_size)
            values = []
            for i in range(self.run.eval_batches):
                _, samples = self.draw(builder, single, i, 0, acc.process_index, "validation")
                batch = collate(samples, pad_id)
                with acc.autocast():
                    loss = model(batch.input_ids.to(acc.device), batch.attention_mask.to(acc.device),
                                 batch.labels.to(acc.device), batch.documents, batch.regions)
                values.append(float(acc.gather(loss.detach().reshape(1)).mean()))
            losses[objective] = round(float(np.mean(values)), 4)
        model.train()
        return losses

    def save(self, model, optimizer, stage_dir: Path, step: int) -> Path:
        """checkpoint_<step>: full-precision weights in the published layout, the optimizer state
        of every process, and the trainer state; older checkpoints beyond `keep_checkpoints` removed."""
        acc = self.accelerator
        target = stage_dir / f"checkpoint_{step}"
        state = acc.get_state_dict(model)  # a collective under FSDP: every process calls it
        if acc.is_main_process:
            shutil.rmtree(target, ignore_errors=True)
            save_checkpoint(acc.unwrap_model(model).lclm, target, state=state)
        acc.wait_for_everyone()
        save_optimizer(optimizer, target / f"optimizer-rank{acc.process_index}")
        acc.wait_for_everyone()
        if acc.is_main_process:
            (target / "trainer_state.json").write_text(json.dumps(
                {"step": step, "world_size": acc.num_processes, "precision": self.precision}, indent=2))
            for _, old in checkpoints(stage_dir)[: -self.run.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return target
