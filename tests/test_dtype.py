"""The studio's dtype (settings, `--dtype` of the CLI): the encoder, the adapter and the decoder
all run in it, every result reports it with the reason, and auto follows the CPU probe (stubbed
for both outcomes, see conftest.matmul_probe)."""

import json

import pytest
import torch

from app.cli import main
from app.engine.service import AskRequest, Studio
from app.engine.settings import Settings

DOC = ("The quick brown fox jumps over the lazy dog. The vault code is 5521. " * 6).strip()
QUESTION = "What is the vault code?"


def studio_in(tmp_path, checkpoint, dtype: str) -> Studio:
    return Studio(Settings(data_dir=tmp_path, device="cpu", dtype=dtype), checkpoint=str(checkpoint))


def answer(studio: Studio, mode: str) -> dict:
    events = list(studio.ask(AskRequest(DOC, QUESTION, method=mode, max_new_tokens=4)))
    return events[-1].result


def parameter_dtypes(model) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters()}


@pytest.mark.parametrize("requested, speedup, expected", [
    ("auto", 6.0, torch.bfloat16), ("auto", 0.02, torch.float32),
    ("float32", 6.0, torch.float32), ("bfloat16", 0.02, torch.bfloat16),
])
@pytest.mark.slow
def test_every_part_of_the_model_runs_in_the_chosen_dtype(tmp_path, tiny_checkpoint, matmul_probe, requested,
                                                          speedup, expected):
    matmul_probe(speedup)
    studio = studio_in(tmp_path, tiny_checkpoint, requested)
    model = studio.model()
    assert parameter_dtypes(model.encoder) == parameter_dtypes(model.adapter) == parameter_dtypes(model.decoder) == {
        expected}
    compressed = studio.compress(DOC)
    assert compressed.latents.dtype == expected
    assert compressed.result.to_dict()["dtype"] == str(expected).removeprefix("torch.")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lclm", "expand"])
def test_every_answer_reports_its_dtype_and_why(tmp_path, tiny_checkpoint, matmul_probe, mode):
    matmul_probe(6.0)
    result = answer(studio_in(tmp_path, tiny_checkpoint, "auto"), mode)
    assert result["dtype"] == "bfloat16" and result["dtype_requested"] == "auto"
    assert result["bf16_probe"]["bf16_speedup"] == 6.0 and "faster" in result["dtype_reason"]
    assert result["kv_cache_bytes"] == result["positions"] * 2 * 2 * 2 * 2 * 16  # 2 layers x 2 heads x 16 dims x bf16


def test_latents_are_cached_per_dtype(tmp_path, tiny_checkpoint):
    """A float32 run must not be served bfloat16 latents from the shared latent cache, nor the reverse."""
    first = studio_in(tmp_path, tiny_checkpoint, "float32").compress(DOC)
    other = studio_in(tmp_path, tiny_checkpoint, "bfloat16").compress(DOC)
    again = studio_in(tmp_path, tiny_checkpoint, "float32").compress(DOC)
    assert not other.result.cached and other.latents.dtype == torch.bfloat16
    assert again.result.cached and torch.equal(again.latents, first.latents)


def test_unknown_dtype_in_settings_is_refused(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16"):
        Settings(data_dir=tmp_path, dtype="float16")


def test_dtype_from_the_environment(monkeypatch):
    monkeypatch.setenv("LCLM_STUDIO_DTYPE", "bfloat16")
    assert Settings.from_env().dtype == "bfloat16"
    assert Settings.from_env(dtype="float32").dtype == "float32"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cli_dtype_flag(capsys, tmp_path, tiny_checkpoint, dtype):
    path = tmp_path / "doc.txt"
    path.write_text(DOC)
    code = main(["ask", str(path), "-q", QUESTION, "--checkpoint", str(tiny_checkpoint), "--dtype", dtype,
                 "--max-new-tokens", "3", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["dtype"] == dtype and result["dtype_requested"] == dtype and result["dtype_reason"] == "asked for"
