"""The training campaign: wall-clock boxes that resume, outputs within the return limits, a
final/ the CLI loads, and each objective and the curriculum learning on a tiny random pair."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model.training.campaign import (
    RECIPES,
    CampaignData,
    Phase,
    Recipe,
    freeze_to,
    set_decoder_lora,
    step_loss,
    trainable_groups,
    validate,
)
from model.training.examples import ExampleBuilder
from model.training.modeling import build_trainable
from model.training.smoke import smoke_run
from tests.test_training import builder, lclm, pair, tiny_corpus  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20


def campaign_command(state: Path, out: Path, minutes: float) -> list[str]:
    return [sys.executable, "-m", "model.training.campaign", "--smoke", "--recipe", "curriculum", "--minutes",
            str(minutes), "--eval-minutes", "0.2", "--threads", "1", "--quiet", "--state", str(state),
            "--out", str(out)]


@pytest.mark.slow
def test_campaign_box_resumes_and_its_final_loads_in_the_cli(tmp_path):
    smoke_run(tmp_path)  # the tiny pair and corpus, made once before the boxes start
    state, out = tmp_path / "state", tmp_path / "out"
    tokens = []
    for _ in range(2):
        done = subprocess.run(campaign_command(state, out, 0.5), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        metrics = json.loads((out / "metrics.json").read_text())
        tokens.append(sum(metrics["tokens"].values()))
    assert 0 < tokens[0] < tokens[1]
    assert (metrics["calls"] == 2 and metrics["evals"][0]["step"] == 0
            and metrics["evals"][-1]["free_running"] is not None)
    saved = json.loads((state / "state.json").read_text())
    assert saved["step"] == metrics["step"] and saved["recipe"]["name"] == "curriculum"
    files = [p for p in [*state.rglob("*"), *out.rglob("*")] if p.is_file()]
    big = [p for p in files if p.suffix == ".safetensors"]
    assert all(p.stat().st_size <= 16 * MiB for p in files)
    assert sum(p.stat().st_size for p in files) <= 64 * MiB and len(big) <= 8
    assert (out / "curve.png").stat().st_size > 0
    doc = tmp_path / "doc.txt"
    doc.write_text("The tiny model reads this short document about a river and a mill. " * 8)
    shown = subprocess.run([sys.executable, "-m", "app.cli", "compress", str(doc), "--checkpoint", str(out / "final"),
                            "--ratio", "4", "--json", "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert json.loads(shown.stdout)["trained"] is True


@pytest.mark.slow
def test_a_state_of_another_recipe_is_refused(tmp_path):
    smoke_run(tmp_path)
    state, out = tmp_path / "state", tmp_path / "out"
    state.mkdir()
    (state / "state.json").write_text(json.dumps({"variant": "smoke", "recipe": {"name": "distill"}}))
    done = subprocess.run(campaign_command(state, out, 0.5), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0


def test_curriculum_phases_follow_the_tokens_trained():
    recipe = RECIPES["curriculum"]
    assert [recipe.phase(t).span_tokens for t in (0, 59_999, 60_000, 299_999, 300_000, 10**9)] == \
        [16, 16, 64, 64, 256, 256]


LEARNING = {
    "reconstruction": Recipe("r", "", phases=(Phase(16),), objectives={"reconstruction": 1.0}, batch_tokens=64,
                             warmup_steps=1, lr={"adapter": 3e-3, "encoder": 3e-3, "decoder": 3e-3, "tags": 3e-3}),
    "decoder LoRA": Recipe("d", "", phases=(Phase(16),), objectives={"reconstruction": 1.0}, batch_tokens=64,
                           warmup_steps=1, train_decoder=True,
                           lr={"adapter": 3e-3, "encoder": 3e-3, "decoder": 3e-3, "tags": 3e-3}),
    "interleaved": Recipe("i", "", phases=(Phase(16),), objectives={"interleaved": 1.0}, batch_tokens=96,
                          warmup_steps=1, interleaved_tokens=48, interleaved_spans=(8, 16),
                          lr={"adapter": 3e-3, "encoder": 3e-3, "decoder": 3e-3, "tags": 3e-3}),
    "distill": Recipe("x", "", phases=(Phase(16),), objectives={"distill": 1.0}, batch_tokens=96, warmup_steps=1,
                      interleaved_tokens=48, interleaved_spans=(8, 16),
                      lr={"adapter": 3e-3, "encoder": 3e-3, "decoder": 3e-3, "tags": 3e-3}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LEARNING))
def test_each_objective_lowers_its_loss_on_a_fixed_batch(name, pair):
    recipe = LEARNING[name]
    lclm = build_trainable(replace(pair, lora=replace(pair.lora, r=recipe.encoder_lora_r // 16)))
    if not recipe.train_decoder:
        set_decoder_lora(lclm.decoder, False)
    groups = trainable_groups(lclm, recipe)
    assert ("decoder" in groups) == recipe.train_decoder and {"adapter", "encoder", "tags"} <= set(groups)
    optimizer = torch.optim.AdamW([p for ps in groups.values() for _, p in ps], lr=3e-3)
    from model.training.data.shards import load_corpus

    data = CampaignData(ExampleBuilder(lclm), load_corpus(pair.corpus), recipe, seed=0)
    batch = data.step(0, 0)
    assert batch.objective == next(iter(recipe.objectives))
    pad = lclm.decoder_tokenizer.pad_token_id or 0
    losses = []
    for _ in range(6):
        loss, correct, count = step_loss(lclm, batch, pad)
        assert 0 <= correct <= count and count > 0
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses
    if not recipe.train_decoder:
        assert not any(p.requires_grad for n, p in lclm.named_parameters() if n.startswith("decoder.") and "lora_" in n)


def test_distillation_targets_are_the_full_context_decoder(pair):
    """With the latents replaced by the raw text's own positions there is nothing to distil:
    the teacher's logits at the plain-text positions equal the decoder's on the raw sequence."""
    from model.training.campaign import teacher_logits
    from model.training.data.shards import load_corpus

    recipe = LEARNING["distill"]
    lclm = build_trainable(pair)
    set_decoder_lora(lclm.decoder, False)
    data = CampaignData(ExampleBuilder(lclm), load_corpus(pair.corpus), recipe, seed=0)
    sources = data.step(0, 0).sources
    target = teacher_logits(lclm, sources)
    raw, spans = sources[0]
    text_positions = [i for i, kind in enumerate(k for k, n in spans for _ in range(n)) if kind == "text" and i > 0]
    with torch.no_grad():
        full = lclm.decoder(input_ids=torch.tensor([raw])).logits[0]  # [T, vocab]
    first = full[[i - 1 for i in text_positions]]
    assert torch.allclose(target[: len(text_positions)], first.float(), atol=1e-4)


@pytest.mark.slow
def test_validation_measures_the_prior_and_free_running_accuracy(pair):
    lclm = build_trainable(pair)
    freeze_to(lclm, torch.float32)
    from model.training.data.shards import load_corpus

    data = CampaignData(ExampleBuilder(lclm), load_corpus(pair.corpus), RECIPES["frozen-recon"], seed=0)
    spans = data.validation_spans(length=16, count=4)
    assert spans == data.validation_spans(length=16, count=4) and all(len(s) == 16 for s in spans)
    result = validate(lclm, data.builder, spans, lclm.decoder_tokenizer.pad_token_id or 0, 2, autocast=False)
    assert 0 <= result["teacher_forced"] <= 1 and 0 <= result["free_running"] <= 1


def test_publish_ships_only_what_beats_its_start_and_the_shipped_variant(tmp_path):
    from types import SimpleNamespace

    from model.training.campaign import publish

    run = SimpleNamespace(name="tiny-run", encoder="enc", decoder="dec")
    out, target = tmp_path / "out", tmp_path / "weights" / "variant"
    (out / "final" / "adapter").mkdir(parents=True)
    (out / "final" / "adapter" / "adapter.safetensors").write_bytes(b"weights")

    def state(teacher_forced: float, free_running: float) -> dict:
        return {"variant": "v", "recipe": {"name": "lora-recon"}, "tokens": {"reconstruction": 1000}, "step": 10,
                "cpu_s": 7200.0, "wall_s": 7300.0, "precision": "bf16", "calls": 2, "lr_scales": [1.0, 0.3],
                "init_from": None,
                "evals": [{"teacher_forced": 0.4, "free_running": 0.03},
                          {"teacher_forced": teacher_forced, "free_running": free_running}]}

    assert not publish(out, state(0.39, 0.10), run, target) and not target.exists()  # worse than its start
    assert not publish(out, state(0.45, 0.02), run, target) and not target.exists()
    assert publish(out, state(0.45, 0.10), run, target)
    card = json.loads((target / "model_card.json").read_text())
    assert (card["trained"] is True and card["cpu_hours"] == 2.0
            and card["tokens_per_objective"] == {"reconstruction": 1000})
    assert card["lr_scales"] == [1.0, 0.3]
    assert (card["validation"]["untrained"]["teacher_forced"] == 0.4
            and (target / "adapter" / "adapter.safetensors").is_file())
    assert not publish(out, state(0.44, 0.20), run, target)  # not better than the shipped 0.45
    assert json.loads((target / "model_card.json").read_text())["validation"]["trained"]["teacher_forced"] == 0.45
    assert publish(out, state(0.5, 0.2), run, target)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["superposed", "first"])
def test_warm_start_pulls_latents_towards_their_token_embeddings(kind, pair):
    from model.training.campaign import embedding_targets, warm_start
    from model.training.data.shards import load_corpus

    lclm = build_trainable(pair)
    recipe = replace(LEARNING["reconstruction"], warm_start_steps=8, warm_target=kind)
    groups = trainable_groups(lclm, recipe)
    data = CampaignData(ExampleBuilder(lclm), load_corpus(pair.corpus), recipe, seed=0)
    documents = [s.documents[0] for s in data.step(0, 0).samples]
    targets = embedding_targets(lclm, documents, kind)
    n = lclm.config.compression_ratio
    assert [t.shape[0] for t in targets] == [-(-len(d) // n) for d in documents]
    table = lclm.decoder.get_input_embeddings().weight
    first = documents[0]
    expected = table[first[:n]].sum(0) / n ** 0.5 if kind == "superposed" else table[first[0]]
    assert torch.allclose(targets[0][0], expected.float(), atol=1e-6)
    decoder_before = {n: p.detach().clone() for n, p in lclm.decoder.named_parameters()}
    result = warm_start(lclm, data, groups, recipe.warm_start_steps, autocast=False, say=lambda m: None, kind=kind)
    assert result["relative_error"] < result["first_error"] and result["tokens"] > 0
    assert all(torch.equal(p, decoder_before[n]) for n, p in lclm.decoder.named_parameters())  # decoder untouched


@pytest.mark.slow
def test_validation_with_other_spans_latents_differs_only_through_the_latents(pair):
    from model.training.data.shards import load_corpus

    lclm = build_trainable(pair)
    data = CampaignData(ExampleBuilder(lclm), load_corpus(pair.corpus), RECIPES["frozen-recon"], seed=0)
    spans = data.validation_spans(length=16, count=8)
    pad = lclm.decoder_tokenizer.pad_token_id or 0
    with torch.no_grad():
        lclm.adapter.fc2.weight.zero_()  # every latent is the adapter's bias: the spans' latents are alike
    result = validate(lclm, data.builder, spans, pad, 0, autocast=False)
    assert result["teacher_forced_other"] == result["teacher_forced"]


@pytest.mark.slow
def test_validate_only_measures_a_final_without_training(tmp_path):
    smoke_run(tmp_path)
    state, out = tmp_path / "state", tmp_path / "out"
    done = subprocess.run(campaign_command(state, out, 0.5), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    step = json.loads((state / "state.json").read_text())["step"]
    shown = subprocess.run([sys.executable, "-m", "model.training.campaign", "--smoke", "--validate-only", "--threads",
                            "1", "--state", str(state), "--init-from", str(out / "final")], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    result = json.loads(shown.stdout.strip().splitlines()[-1])
    assert result["checkpoint"] == str(out / "final")
    assert all(0 <= result[k] <= 1 for k in ("teacher_forced", "teacher_forced_other", "free_running"))
    assert json.loads((state / "state.json").read_text())["step"] == step  # nothing trained


@pytest.mark.slow
def test_the_chosen_recipe_warm_starts_within_the_box_then_trains(tmp_path):
    smoke_run(tmp_path)
    state, out = tmp_path / "state", tmp_path / "out"
    command = campaign_command(state, out, 0.4)
    command[command.index("curriculum")] = next(iter(RECIPES))
    assert RECIPES[next(iter(RECIPES))].warm_start_steps > 0
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    warm = metrics["warm_start"]
    assert 0 < warm["steps"] and warm["relative_error"] < warm["first_error"]
    assert metrics["tokens"]["warm_start"] == warm["tokens"] > 0 and metrics["tokens"]["reconstruction"] > 0
    assert metrics["wall_s"] <= 0.4 * 60 + 30
    assert [e["step"] for e in metrics["evals"][:2]] == [0, 0]  # the prior, then after the warm start
