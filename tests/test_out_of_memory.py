"""Running out of memory during compress or generate: the request fails with one message that
suggests a higher ratio or a shorter document, its tensors are released, and the next request
gives the same result as if nothing had happened. The failure is injected: the encoder's or the
decoder's forward raises torch.OutOfMemoryError once (see the `out_of_memory` fixture)."""

import weakref

import pytest
import torch
from transformers import Qwen3ForCausalLM

import app.engine.methods
import app.engine.models
from app.cli import main
from app.engine.memory import is_out_of_memory
from app.engine.service import AskRequest, Studio
from app.engine.settings import Settings
from model.errors import OUT_OF_MEMORY, OutOfMemory, UserError
from model.lclm import LCLM
from tests.test_service import DOC, QUESTION, studio  # noqa: F401 - the Studio fixture on the tiny checkpoint

ERROR_LINE = f"error: {OUT_OF_MEMORY}"


def answer(studio, mode="lclm", **kwargs):
    events = list(studio.ask(AskRequest(DOC, QUESTION, method=mode, max_new_tokens=8, **kwargs)))
    return events[-1].result["answer"]


def test_out_of_memory_is_a_user_error_with_one_message():
    assert issubclass(OutOfMemory, UserError) and str(OutOfMemory()) == OUT_OF_MEMORY
    assert "higher compression ratio" in OUT_OF_MEMORY and "shorter document" in OUT_OF_MEMORY
    for err in (torch.OutOfMemoryError("boom"), MemoryError(), RuntimeError("MPS backend out of memory")):
        assert is_out_of_memory(err)
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("out of memory"))


@pytest.mark.slow
def test_out_of_memory_while_compressing(studio, out_of_memory):
    reference = studio.compress(DOC, use_cache=False).latents
    calls = out_of_memory(studio.model().encoder.model, "forward")
    with pytest.raises(OutOfMemory, match=OUT_OF_MEMORY) as failure:
        studio.compress(DOC)
    assert calls == [1] and failure.value.__context__ is None and failure.value.__cause__ is None
    assert len(studio.store.cache) == 0  # nothing stored for the failed request
    again = studio.compress(DOC)
    assert again.result.cached is False and torch.equal(again.latents, reference)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lclm", "expand"])
@pytest.mark.parametrize("call", [1, 4], ids=["prefill", "decode"])
def test_out_of_memory_while_generating(studio, out_of_memory, mode, call):
    reference = answer(studio, mode)
    calls = out_of_memory(studio.model().decoder, "forward", call=call)
    streamed = []
    with pytest.raises(OutOfMemory, match=OUT_OF_MEMORY):
        for event in studio.ask(AskRequest(DOC, QUESTION, method=mode, max_new_tokens=8)):
            streamed.append(event.kind)
    assert len(calls) == call and "done" not in streamed
    assert answer(studio, mode) == reference


@pytest.mark.slow
def test_a_failed_request_leaves_no_tensors_behind(studio, out_of_memory, monkeypatch):
    """The latents and the KV cache of the failed request are freed when the error is raised."""
    model = studio.model()
    answer(studio)  # warm up: the first request builds lazily created state
    held: list[weakref.ref] = []

    def tracked(call):
        def wrapper(*args, **kwargs):
            result = call(*args, **kwargs)
            made = result if isinstance(result, list) else [getattr(result, "cache", result)]
            held.extend(weakref.ref(x) for x in made)  # each window's latents, or the prefill's KV cache
            return result
        return wrapper

    monkeypatch.setattr(model, "compress_group", tracked(model.compress_group))
    monkeypatch.setattr(app.engine.methods, "prefill", tracked(app.engine.methods.prefill))
    out_of_memory(model.decoder, "forward", call=3)  # inside the decode loop
    with pytest.raises(OutOfMemory) as failure:
        list(studio.ask(AskRequest(DOC, QUESTION, method="lclm", max_new_tokens=8, use_cache=False)))
    assert len(held) >= 2  # the latents (one tensor per window) and the KV cache were made
    # ... and are gone while the error is still held (as the CLI or the UI holds it to show it)
    assert failure.value is not None and [ref() for ref in held] == [None] * len(held)


@pytest.mark.slow
def test_memory_errors_of_the_host_are_caught_too(studio, monkeypatch):
    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(app.engine.methods, "prefill", no_memory)
    with pytest.raises(OutOfMemory, match=OUT_OF_MEMORY):
        answer(studio, "full")


def test_other_runtime_errors_are_not_taken_for_memory(studio, monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(app.engine.methods, "prefill", bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        answer(studio, "full")


@pytest.mark.slow
def test_out_of_memory_while_reconstructing(studio, out_of_memory):
    reference = studio.reconstruct(DOC, max_chunks=2)
    out_of_memory(studio.model().decoder, "forward", call=2)
    with pytest.raises(OutOfMemory, match=OUT_OF_MEMORY):
        studio.reconstruct(DOC, max_chunks=2)
    again = studio.reconstruct(DOC, max_chunks=2)
    assert again["chunks"] == reference["chunks"]


@pytest.mark.parametrize("command, target", [
    (["compress"], lambda: (LCLM, "compress_group", 1)),
    (["ask", "-q", QUESTION, "--mode", "lclm"], lambda: (Qwen3ForCausalLM, "forward", 2)),  # 2nd forward: decoding
    (["ask", "-q", QUESTION, "--mode", "full"], lambda: (app.engine.methods, "prefill", 1)),
], ids=["compress", "ask-decode", "ask-prefill"])
@pytest.mark.slow
def test_cli_prints_one_line_and_the_next_run_works(capsys, tmp_path, tiny_checkpoint, out_of_memory, command,
                                                    target):
    path = tmp_path / "doc.txt"
    path.write_text(DOC)
    args = [command[0], str(path), *command[1:], "--checkpoint", str(tiny_checkpoint), "--json"]
    calls = out_of_memory(*target())
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert calls and out == "" and "Traceback" not in err
    lines = err.splitlines()  # progress bars (tqdm) above, then the one error line
    assert lines[-1] == ERROR_LINE and [line for line in lines if "error" in line] == [ERROR_LINE]
    assert main(args) == 0, capsys.readouterr().err


@pytest.mark.slow
def test_out_of_memory_while_loading_a_model(tmp_path, tiny_checkpoint, monkeypatch):
    studio = Studio(Settings(data_dir=tmp_path, device="cpu"), checkpoint=str(tiny_checkpoint))

    def no_room(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    with monkeypatch.context() as patch:
        patch.setattr(app.engine.models, "build_lclm", no_room)
        with pytest.raises(OutOfMemory, match=r"^out of memory while loading .*; free memory on the device"):
            studio.model()
    assert isinstance(studio.model(), LCLM)  # nothing half-loaded was kept: the next start works


@pytest.mark.slow
def test_the_page_shows_out_of_memory_from_outside_the_services_and_raises_bugs():
    import gradio as gr

    from views.common import user_errors

    @user_errors
    def projection():
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    @user_errors
    def streamed():
        yield 1
        raise MemoryError()

    @user_errors
    def bug():
        raise RuntimeError("shape mismatch")

    with pytest.raises(gr.Error) as shown:
        projection()
    assert shown.value.message == OUT_OF_MEMORY
    with pytest.raises(gr.Error) as shown:
        list(streamed())
    assert shown.value.message == OUT_OF_MEMORY
    with pytest.raises(RuntimeError, match="shape mismatch"):
        bug()
