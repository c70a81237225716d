"""A campaign on disk: its resumable STATE/ (`save_state`, `load_state`), its OUT/ (final/,
metrics.json, curve.png: `write_outputs`), the model card, and publishing to model/weights/
when the validation improves.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model import precision
from model.training.campaign.recipes import FREE_RUNNING_SPANS, VALIDATION_SPAN, VALIDATION_SPANS
from model.training.config import RunConfig
from model.training.modeling import load_optimizer, save_checkpoint, save_optimizer


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
