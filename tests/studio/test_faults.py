"""Faults seen through the UI's API. In-process (so that a failure can be injected): running out
of memory during compress or an answer shows one message and the next request works; a cancelled
answer stops generating. Against `python app.py`: an answer cancelled by its client, or whose
client goes away, frees the model slot for the next user."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from gradio_client.utils import Status

import app.engine.methods
from app.engine.service import Studio
from app.engine.settings import Settings
from app.studio.catalog import build_catalog
from app.studio.workspace import Workspace
from model.errors import OUT_OF_MEMORY
from tests.studio.conftest import DOCUMENT, ROOT, free_port, wait_until

pytestmark = pytest.mark.server

MODEL = ("--checkpoint", 4, "mean")  # family, ratio, pooling
QUESTION = "What is the vault code?"
LONG = 2000  # new tokens: far longer than any test waits for


def ask_args(max_new_tokens: int, question: str = QUESTION, full: bool = False) -> tuple:
    return (*MODEL, question, "lclm", full, "none", max_new_tokens)


def short_answer(client: Client) -> str:
    """The LCLM's answer to QUESTION in 6 new tokens, in this client's session."""
    job = client.submit(*ask_args(6), api_name="/ask")
    job.result(timeout=60)
    return job.outputs()[-1][0]


def new_client(url: str, tmp_path) -> Client:
    client = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path))
    client.predict(DOCUMENT, None, *MODEL, api_name="/load_document")
    return client


# ---- in-process app -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inprocess(tiny_checkpoint_factory, tmp_path_factory):
    """(workspace, url): the studio's UI served from this process, so tests can patch its models."""
    from views.studio import build_app

    settings = Settings(data_dir=tmp_path_factory.mktemp("home"), device="cpu", chunk_tokens=32)
    workspace = Workspace(Studio(settings), build_catalog([str(tiny_checkpoint_factory(ratio=4))]))
    demo = build_app(workspace)
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield workspace, demo.local_url
    demo.close()


@pytest.mark.parametrize("where", ["compress", "prefill", "decode"])
def test_out_of_memory_shows_one_message_and_the_next_request_works(inprocess, tmp_path, out_of_memory, where):
    workspace, url = inprocess
    client = new_client(url, tmp_path)
    reference = short_answer(client)
    model = workspace.model(workspace.catalog.default)
    workspace.studio.store.cache.clear()  # so that the next answer compresses again
    owner, call = {"compress": (model.encoder.model, 1), "prefill": (model.decoder, 1),
                   "decode": (model.decoder, 3)}[where]
    calls = out_of_memory(owner, "forward", call=call)
    with pytest.raises(AppError) as failure:
        short_answer(client)
    assert str(failure.value) == OUT_OF_MEMORY and len(calls) == call
    assert short_answer(client) == reference  # the studio is still up, and answers as before


def test_a_cancelled_answer_stops_generating(inprocess, tmp_path, monkeypatch):
    workspace, url = inprocess
    monkeypatch.setattr(app.engine.methods, "stop_token_ids", lambda tokenizer, decoder: set())  # never stops early
    tokens, closed = [], []
    ask = workspace.studio.ask

    def watched(*args, **kwargs):
        try:
            for event in ask(*args, **kwargs):
                tokens.append(event.kind)
                yield event
        finally:
            closed.append("done" in tokens)

    monkeypatch.setattr(workspace.studio, "ask", watched)
    client = new_client(url, tmp_path)
    job = client.submit(*ask_args(LONG), api_name="/ask")
    wait_until(lambda: len(tokens) > 5, timeout_s=60)
    job.cancel()
    wait_until(lambda: closed, timeout_s=60)
    assert closed == [False] and len(tokens) < LONG  # closed early: the generator was shut, not run out
    generated = len(tokens)
    assert short_answer(new_client(url, tmp_path))  # the slot is free for the next request
    since = tokens[generated:]  # only the new request's (at most 6) tokens and its "done" came since
    assert since[-1] == "done" and since.count("done") == 1 and len(since) <= 7


# ---- against `python app.py` ------------------------------------------------------------------------
def test_cancelling_an_answer_frees_the_slot(studio_url, tmp_path):
    first, second = new_client(studio_url, tmp_path), new_client(studio_url, tmp_path)
    expected = short_answer(second)
    long_answer = first.submit(*ask_args(LONG, "Tell me everything.", full=True), api_name="/ask")
    wait_until(lambda: long_answer.status().code == Status.ITERATING, timeout_s=60)
    long_answer.cancel()
    assert short_answer(second) == expected  # result(timeout=60) inside: it ran, and answered as before
    wait_until(lambda: long_answer.done(), timeout_s=60)


CLIENT_THAT_GOES_AWAY = textwrap.dedent("""
    import sys, time
    from gradio_client import Client
    from gradio_client.utils import Status
    client = Client(sys.argv[1], verbose=False, analytics_enabled=False)
    client.predict({document!r}, None, *{model!r}, api_name="/load_document")
    job = client.submit(*{ask!r}, api_name="/ask")
    while job.status().code != Status.ITERATING:
        time.sleep(0.05)
    print("streaming", flush=True)
    time.sleep(600)
""").format(document=DOCUMENT, model=MODEL, ask=ask_args(LONG, "Tell me everything.", full=True))


def test_a_client_that_goes_away_frees_the_slot(studio_url, tmp_path):
    second = new_client(studio_url, tmp_path)
    expected = short_answer(second)
    gone = subprocess.Popen([sys.executable, "-c", CLIENT_THAT_GOES_AWAY, studio_url], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert gone.stdout.readline().strip() == "streaming"
    finally:
        gone.kill()  # like a closed browser tab: the connection drops mid-stream
        gone.wait(30)
    assert short_answer(second) == expected
