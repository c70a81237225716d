"""The decoder served by vLLM (app/engine/decoder_server.py) against the decoder in this
process: the same prompt embeddings give the same greedy answer, in float32 on CPU, for LCLM,
EXPAND and full context (on a decoder LoRA's base model too); questions asked at once all come
back; the servers end with the studio. Needs the serving environment (`make serving`, which
`make test` runs); the tiny decoders have heads of 32 dimensions, the least vLLM's CPU
attention serves."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from app.engine.decoder_server import serving_python
from app.engine.service import AskRequest, Studio
from app.engine.settings import Settings
from model.errors import UserError

pytestmark = [pytest.mark.serving, pytest.mark.slow]

DOC = ("The archive opens at nine. The vault code is 4417 and the courier is called Imre. "
       "Nothing else happened that day. ") * 4
QUESTIONS = ["What is the vault code?", "Who is the courier?", "When does the archive open?"]


def serving_installed() -> bool:
    try:
        return serving_python().is_file()
    except UserError:
        return False


@pytest.fixture(scope="module")
def studios(tiny_checkpoint_factory, tmp_path_factory):
    """(in-process, served) studios over one tiny LoRA checkpoint whose decoder vLLM can serve."""
    if not serving_installed():
        pytest.skip("the serving environment is not installed (make serving)")
    checkpoint = str(tiny_checkpoint_factory(family="qwen3", ratio=4, pooling="mean", window=16, lora=True,
                                             decoder_head_dim=32))
    data: Path = tmp_path_factory.mktemp("serving-data")
    local = Studio(Settings(data_dir=data, dtype="float32"), checkpoint=checkpoint)
    served = Studio(Settings(data_dir=data, dtype="float32", decoder="vllm"), checkpoint=checkpoint)
    yield local, served
    served.close()


def answer(studio: Studio, question: str, method: str, tokens: int = 12):
    return list(studio.ask(AskRequest(DOC, question, method=method, max_new_tokens=tokens)))[-1].answer


@pytest.mark.parametrize("method", ["lclm", "full", "expand"])
def test_vllm_gives_the_in_process_greedy_answer(studios, method):
    local, served = studios
    here, there = answer(local, QUESTIONS[0], method), answer(served, QUESTIONS[0], method)
    # a random decoder may end on half of a UTF-8 character: this process shows it as U+FFFD, vLLM drops it
    assert there.text == here.text.rstrip("\ufffd") and there.stopped == here.stopped
    assert there.measurement.new_tokens == here.measurement.new_tokens
    assert there.measurement.positions == here.measurement.positions  # the same prompt, built here
    if method == "expand":
        assert ([r["raw_output"] for r in there.expand.rounds]
                == [r["raw_output"].rstrip("\ufffd") for r in here.expand.rounds])
    assert any("decoded by a vLLM server" in w for w in there.warnings)
    assert not any("vLLM" in w for w in here.warnings)


def test_vllm_reconstructs_the_chunks_as_this_process_does(studios):
    local, served = studios
    here, there = (s.reconstruct(DOC, max_chunks=2, chunk_tokens=32) for s in (local, served))
    assert [c["token_accuracy"] for c in there["chunks"]] == [c["token_accuracy"] for c in here["chunks"]]
    assert [c["reconstructed"] for c in there["chunks"]] == [c["reconstructed"] for c in here["chunks"]]


def test_questions_asked_at_once_all_come_back_as_asked_alone(studios):
    local, served = studios
    alone = {q: answer(local, q, "lclm").text.rstrip("\ufffd") for q in QUESTIONS}  # see the test above
    together: dict[str, str] = {}
    threads = [threading.Thread(target=lambda q=q: together.__setitem__(q, answer(served, q, "lclm").text))
               for q in QUESTIONS * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert together == alone


def test_the_servers_end_with_the_studio(studios, tiny_checkpoint_factory, tmp_path):
    checkpoint = str(tiny_checkpoint_factory(family="qwen3", ratio=4, pooling="mean", window=16,
                                             decoder_head_dim=32))
    studio = Studio(Settings(data_dir=tmp_path, dtype="float32", decoder="vllm"), checkpoint=checkpoint)
    assert answer(studio, QUESTIONS[0], "lclm", tokens=2).measurement.ttft_ms > 0
    processes = [s.process for s in studio.decoders._started.values()]
    assert len(processes) == 1 and processes[0].poll() is None
    studio.close()
    assert processes[0].poll() is not None


@pytest.mark.server
def test_the_studio_answers_through_vllm_and_its_servers_end_with_it(tiny_checkpoint_factory, tmp_path):
    """`app.py --decoder vllm`: the Ask endpoint answers through a vLLM server that the studio
    started, several users at once; SIGTERM ends the studio and the server with it."""
    import psutil
    from gradio_client import Client

    from tests.studio.conftest import DOCUMENT, Server

    if not serving_installed():
        pytest.skip("the serving environment is not installed (make serving)")
    checkpoint = str(tiny_checkpoint_factory(family="qwen3", ratio=4, pooling="mean", window=16,
                                             decoder_head_dim=32))
    server = Server(["--checkpoint", checkpoint, "--decoder", "vllm", "--dtype", "float32"], tmp_path / "home",
                    env={"LCLM_STUDIO_AUTH": ""})
    try:
        url = server.wait()
        clients = [Client(url, verbose=False, analytics_enabled=False) for _ in range(3)]
        model = ("--checkpoint", 4, "mean")
        for client in clients:
            client.predict(DOCUMENT, None, *model, api_name="/load_document")
        jobs = [c.submit(*model, "What is the vault code?", "lclm", False, "none", 4, api_name="/ask")
                for c in clients]
        finals = [job.result(timeout=600) and job.outputs()[-1] for job in jobs]
        answers = {f[7][next(iter(f[7]))]["answer"] for f in finals}  # the results JSON: one LCLM answer each
        assert len(answers) == 1  # the same document and question: the same greedy answer for all three
        assert all("decoded by a vLLM server" in " ".join(next(iter(f[7].values()))["warnings"]) for f in finals)
        served = [p for p in psutil.Process(server.process.pid).children(recursive=True)
                  if "vllm.entrypoints" in " ".join(p.cmdline())]
        assert served
    finally:
        server.stop()
    gone, alive = psutil.wait_procs(served, timeout=60)
    assert not alive


def test_serve_decoder_and_ask_with_its_url_from_the_command_line(tiny_checkpoint_factory, tmp_path):
    """`lclm serve-decoder` serves a variant's decoder; `lclm ask --decoder-url` answers through
    it, as `lclm ask` does in-process."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    if not serving_installed():
        pytest.skip("the serving environment is not installed (make serving)")
    checkpoint = str(tiny_checkpoint_factory(family="qwen3", ratio=4, pooling="mean", window=16,
                                             decoder_head_dim=32))
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "LCLM_STUDIO_HOME": str(tmp_path / "home")}
    cli = [sys.executable, "-m", "app.cli"]
    served = subprocess.Popen([*cli, "serve-decoder", "--checkpoint", checkpoint, "--dtype", "float32"], cwd=root,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = served.stdout.readline()  # "serving ... at URL (...)" once healthy
        assert line.startswith("serving "), line
        url = line.split(" at ", 1)[1].split()[0]
        ask = [*cli, "ask", str(doc), "-q", QUESTIONS[0], "--checkpoint", checkpoint, "--dtype", "float32",
               "--max-new-tokens", "8", "--json"]
        there = subprocess.run([*ask, "--decoder-url", url], cwd=root, env=env, capture_output=True, text=True,
                               timeout=600)
        here = subprocess.run(ask, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert there.returncode == 0 and here.returncode == 0, there.stderr[-2000:] + here.stderr[-2000:]
        there, here = json.loads(there.stdout), json.loads(here.stdout)
        assert there["answer"] == here["answer"].rstrip("\ufffd") and there["positions"] == here["positions"]
        assert any("vLLM" in w for w in there["warnings"])
    finally:
        served.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 60
        while served.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if served.poll() is None:
            served.kill()
