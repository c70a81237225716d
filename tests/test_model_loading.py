"""The loader: round trips in the published layout, LoRA components, checkpoint_<step>
sub-folders, and one clear CheckpointError for each thing that cannot be loaded."""

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from model.checkpoint import find_layout
from model.config import LCLMConfig
from model.errors import CheckpointError
from model.generation import Sampling, decode, prefill
from model.loading import load_lclm, resolve, save_lclm
from model.prompts import memory_region
from tests.tiny_models import CORPUS

FAMILIES = ["qwen3", "llama"]


def latents_of(lclm, text: str = CORPUS[:300]) -> torch.Tensor:
    return lclm.compress(lclm.tokenize_document(text).ids)


def greedy_ids(lclm, text: str = CORPUS[:300], max_new_tokens: int = 8) -> list[int]:
    latents = latents_of(lclm, text)
    prompt = lclm.chat(f"{memory_region(latents.shape[0])}\nWhat is the vault code?")
    state = prefill(lclm.decoder, lclm.prepare(prompt, [latents]).inputs_embeds)
    return list(decode(lclm.decoder, state, max_new_tokens, stop_ids=set(), sampling=Sampling()))


def assert_same_model(a, b) -> None:
    assert a.config == b.config
    assert a.tokenize_document(CORPUS).ids == b.tokenize_document(CORPUS).ids
    assert a.decoder_tokenizer.get_vocab() == b.decoder_tokenizer.get_vocab()
    assert torch.equal(latents_of(a), latents_of(b))
    assert greedy_ids(a) == greedy_ids(b)


# ---- round trips -------------------------------------------------------------------------
def test_layout_on_disk(tiny_checkpoint):
    assert json.loads((tiny_checkpoint / "model_config.json").read_text())["compression_ratio"] == 4
    for kind in ("decoder", "encoder"):
        assert (tiny_checkpoint / kind / "config.json").is_file()
        assert list((tiny_checkpoint / kind).glob("*.safetensors"))
        assert (tiny_checkpoint / kind / "tokenizer.json").is_file()
    assert (tiny_checkpoint / "adapter" / "adapter.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pooling", ["mean", "concat"])
def test_save_load_round_trip(tiny_checkpoint_factory, tmp_path, family, pooling):
    path = tiny_checkpoint_factory(family=family, pooling=pooling)
    first = load_lclm(str(path), device="cpu")
    assert first.config == LCLMConfig.load(path / "model_config.json")
    assert first.config.pooling == pooling and first.config.compression_ratio == 4
    assert first.dtype == torch.float32 and first.device.type == "cpu"
    assert first.checkpoint_id.startswith(f"{path.resolve()}@")
    save_lclm(first, tmp_path / "again")
    second = load_lclm(str(tmp_path / "again"), device="cpu")
    assert_same_model(first, second)
    assert len(greedy_ids(first)) == 8


def test_loading_is_deterministic(tiny_checkpoint):
    a, b = load_lclm(str(tiny_checkpoint), device="cpu"), load_lclm(str(tiny_checkpoint), device="cpu")
    assert a.checkpoint_id == b.checkpoint_id
    assert torch.equal(latents_of(a), latents_of(b))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_checkpoint_loads_merged_and_differs_from_its_base(tiny_checkpoint_factory, tmp_path, family):
    path = tiny_checkpoint_factory(family=family, lora=True)
    for kind in ("decoder", "encoder"):
        config = json.loads((path / kind / "adapter_config.json").read_text())
        assert (path / kind / "adapter_model.safetensors").is_file()
        assert not (path / kind / "config.json").exists()
        base_dir = Path(config["base_model_name_or_path"])
        assert base_dir == path.with_name(path.name + "-base") / kind and (base_dir / "config.json").is_file()
    lora = load_lclm(str(path), device="cpu")
    assert not any("lora" in name for name, _ in lora.named_parameters())  # merged
    # same base weights and adapter, so the LoRA is the only difference
    plain = load_lclm(str(tiny_checkpoint_factory(family=family)), device="cpu")
    ids = lora.tokenize_document(CORPUS[:300]).ids
    assert ids == plain.tokenize_document(CORPUS[:300]).ids
    with torch.inference_mode():
        pooled_lora, pooled_plain = lora.encoder(ids), plain.encoder(ids)
        embeds = plain.prepare(plain.chat("Hello there")).inputs_embeds
        logits_lora = lora.decoder(inputs_embeds=embeds).logits
        logits_plain = plain.decoder(inputs_embeds=embeds).logits
    assert pooled_lora.shape == pooled_plain.shape
    assert not torch.allclose(pooled_lora, pooled_plain, atol=1e-3)
    assert not torch.allclose(logits_lora, logits_plain, atol=1e-3)
    assert greedy_ids(lora, max_new_tokens=12) != greedy_ids(plain, max_new_tokens=12)
    # saving writes full (merged) components, which load to the same model
    save_lclm(lora, tmp_path / "merged")
    assert not (tmp_path / "merged" / "decoder" / "adapter_config.json").exists()
    assert_same_model(lora, load_lclm(str(tmp_path / "merged"), device="cpu"))


# ---- checkpoint_<step> sub-folders -------------------------------------------------------
def test_newest_checkpoint_step_is_chosen(tiny_checkpoint_factory, tmp_path):
    run = tmp_path / "run"
    for step, ratio in ((100, 4), (300, 4), (2000, 8)):
        shutil.copytree(tiny_checkpoint_factory(ratio=ratio), run / f"checkpoint_{step}")
    # newer folders without the layout are skipped, as are names that are not checkpoint_<int>
    (run / "checkpoint_5000").mkdir()
    (run / "checkpoint_5000" / "model_config.json").write_text("{}")
    shutil.copytree(tiny_checkpoint_factory(ratio=4), run / "checkpoint_9999x")
    assert find_layout(run) == run / "checkpoint_2000"  # 2000 > 300 as numbers, not as strings
    lclm = load_lclm(str(run), device="cpu")
    assert lclm.config.compression_ratio == 8
    assert lclm.count_latents(40) == 5


def test_top_level_layout_wins_over_steps(tiny_checkpoint_factory, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint_factory(ratio=4), root)
    shutil.copytree(tiny_checkpoint_factory(ratio=8), root / "checkpoint_10")
    assert find_layout(root) == root
    assert resolve(str(root)).config.compression_ratio == 4


# ---- errors --------------------------------------------------------------------------------
def test_missing_path_that_is_not_a_hub_id(tmp_path):
    for spec in (str(tmp_path / "no-such-model"), "no-such-model", "./a/b"):
        with pytest.raises(CheckpointError, match="not found"):
            load_lclm(spec, device="cpu")


def test_a_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file"):
        load_lclm(str(tmp_path / "model.safetensors"), device="cpu")


def test_directory_not_in_the_layout(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="not an LCLM checkpoint"):
        load_lclm(str(tmp_path), device="cpu")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_checkpoint, partial)
    shutil.rmtree(partial / "encoder")
    with pytest.raises(CheckpointError, match="encoder/"):
        load_lclm(str(partial), device="cpu")


def test_missing_adapter_file(tiny_checkpoint, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "adapter" / "adapter.safetensors").unlink()
    with pytest.raises(CheckpointError, match="adapter.safetensors"):
        load_lclm(str(broken), device="cpu")


def test_invalid_model_config(tiny_checkpoint, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model_config.json").write_text(json.dumps({"compression_ratio": 4, "encoder_window_size": 10}))
    with pytest.raises(CheckpointError, match="not a valid LCLM config"):
        load_lclm(str(broken), device="cpu")
    (broken / "model_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid LCLM config"):
        load_lclm(str(broken), device="cpu")


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_pickle_only_component_is_refused_unread(tiny_checkpoint, tmp_path, no_unpickling, kind):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, broken)
    for weights in (broken / kind).glob("*.safetensors"):
        weights.unlink()
    (broken / kind / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickle") as err:
        load_lclm(str(broken), device="cpu")
    assert "pytorch_model.bin" in str(err.value) and "safetensors" in str(err.value)


def test_lora_with_pickled_adapter_weights_is_refused(tiny_checkpoint_factory, tmp_path, no_unpickling):
    lora = tiny_checkpoint_factory(lora=True)
    broken = tmp_path / "ckpt"
    shutil.copytree(lora, broken)
    (broken / "decoder" / "adapter_model.safetensors").unlink()
    (broken / "decoder" / "adapter_model.bin").write_bytes(b"\x80\x04junk")
    with pytest.raises(CheckpointError, match="pickle"):
        load_lclm(str(broken), device="cpu")


def test_lora_on_an_unknown_base(tiny_checkpoint_factory, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint_factory(lora=True), broken)
    config_file = broken / "encoder" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="LoRA"):
        load_lclm(str(broken), device="cpu")


@pytest.mark.parametrize("spec", ["latent-context/0.6b-4b-LCLM-16x", "someone/some-model"])
def test_hub_id_while_offline_fails_at_once(spec):
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="hub"):
        load_lclm(spec, device="cpu")
    assert time.perf_counter() - started < 5


def test_ratio_that_does_not_match_the_checkpoint(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="compresses at 1:4, not 1:8"):
        load_lclm(str(tiny_checkpoint), ratio=8, device="cpu")
    assert load_lclm(str(tiny_checkpoint), ratio=4, device="cpu").config.compression_ratio == 4


def test_pooling_that_does_not_match_the_checkpoint(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="uses mean pooling, not concat"):
        load_lclm(str(tiny_checkpoint), pooling="concat", device="cpu")
    assert load_lclm(str(tiny_checkpoint), pooling="mean", device="cpu").config.pooling == "mean"


def test_adapter_that_does_not_fit(tiny_checkpoint_factory, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint_factory(pooling="mean"), broken)
    shutil.copy(tiny_checkpoint_factory(pooling="concat") / "adapter" / "adapter.safetensors",
                broken / "adapter" / "adapter.safetensors")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_lclm(str(broken), device="cpu")


def test_every_assembled_lclm_checks_its_adapter_file(tiny_lclm_factory, tiny_checkpoint_factory, tmp_path):
    """assemble_lclm (behind the loader, the studio's shared-weight variants and training) names
    the tensors an adapter file lacks, should not hold or holds in another shape, and refuses
    anything but safetensors; a fitting file loads exactly."""
    from safetensors.torch import load_file, save_file

    from model.loading import assemble_lclm

    lclm = tiny_lclm_factory(pooling="mean")
    components = (lclm.encoder.model, lclm.encoder_tokenizer, lclm.decoder, lclm.decoder_tokenizer)
    own = tiny_checkpoint_factory(pooling="mean") / "adapter" / "adapter.safetensors"
    assembled = assemble_lclm(lclm.config, *components, adapter_file=own)
    for name, tensor in lclm.adapter.state_dict().items():
        assert torch.equal(assembled.adapter.state_dict()[name], tensor), name
    state = load_file(own)
    state["extra.weight"] = state.pop("fc1.bias")
    state["norm.weight"] = torch.zeros(state["norm.weight"].shape[0] + 1)
    save_file(state, tmp_path / "renamed.safetensors")
    with pytest.raises(CheckpointError) as caught:
        assemble_lclm(lclm.config, *components, adapter_file=tmp_path / "renamed.safetensors")
    assert str(caught.value) == (f"{tmp_path / 'renamed.safetensors'} does not fit this checkpoint's adapter: "
                                 "missing fc1.bias; unexpected extra.weight; norm.weight is [25], not [24]")
    (tmp_path / "pickled.safetensors").write_bytes(b"\x80\x04\x95 a pickle")
    with pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        assemble_lclm(lclm.config, *components, adapter_file=tmp_path / "pickled.safetensors")
