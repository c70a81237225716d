"""The campaign's loop: the LCLM loaded for training, the throughput probe that picks the batch
on CUDA, one wall-clock box of training with validation that saves and resumes (`campaign`),
and the validation of a checkpoint (`validate_checkpoint`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from model.precision import fast_dtype
from model.training.campaign.data import QUESTION_OBJECTIVES, CampaignData
from model.training.campaign.objectives import freeze_to, set_decoder_lora, step_loss, trainable_groups, warm_start
from model.training.campaign.recipes import FREE_RUNNING_SPANS, VALIDATION_SPAN, Recipe, run_config
from model.training.campaign.state import cpu_name, load_state, save_state, write_outputs
from model.training.campaign.validation import validate, validate_questions, validation_questions
from model.training.config import RunConfig
from model.training.data.shards import load_corpus
from model.training.examples import ExampleBuilder
from model.training.modeling import build_trainable
from model.training.teacher import TeacherCache
from model.training.trainer import StopRequested

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
SAVE_MARGIN_S = 45.0  # stop this long before the box ends, for validation and saving


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
