"""Bad input through the CLI and the services: each one is a single exact `error: ...` line
on stderr with exit status 2 (no traceback), or the same UserError from the services."""

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import app.ingest
from app.cli import main
from app.engine.service import Studio
from app.engine.settings import Settings
from app.ingest import MAX_FILE_BYTES
from app.studio.catalog import CHECKPOINT_FAMILY, Catalog, Variant
from app.studio.documents import DocumentStore
from app.studio.workspace import Workspace
from model.errors import UserError
from tests.bad_files import BAD_FILES

DOC = ("Alpha beta gamma delta. The vault code is 5521. " * 12).strip()
ROOT = Path(__file__).resolve().parent.parent
LAYOUT_HINT = "it needs model_config.json, decoder/, encoder/ (or a checkpoint_<step>/ folder holding them)"


def cli_error(capsys, *args) -> str:
    """Run the CLI, check it failed the way a user error should, and return the message."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("...")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0].removeprefix("error: ")


@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(DOC)
    return path


# ---- files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[name for name, _, _ in BAD_FILES])
def test_bad_file(capsys, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    assert cli_error(capsys, "compress", path) == message
    with pytest.raises(UserError) as err:
        DocumentStore().load(path=str(path))
    assert str(err.value) == message


def test_file_over_the_size_limit_is_refused_unread(capsys, tmp_path, monkeypatch):
    path = tmp_path / "huge.txt"
    with path.open("wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: nothing is written
    monkeypatch.setattr(app.ingest, "read_bounded", lambda *args: pytest.fail("an oversized file was read"))
    assert cli_error(capsys, "compress", path) == "huge.txt is 52,428,801 bytes; the limit is 52,428,800 bytes (50 MiB)"


def test_missing_file_and_directory(capsys, tmp_path):
    assert cli_error(capsys, "compress", tmp_path / "missing.txt") == f"{tmp_path / 'missing.txt'}: no such file"
    assert cli_error(capsys, "compress", tmp_path) == f"{tmp_path} is a directory, not a document"


@pytest.fixture
def unix_socket(tmp_path):
    path = tmp_path / "studio.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        yield path


@pytest.mark.parametrize("make, kind", [
    (lambda tmp_path, sock: os.symlink("/dev/zero", tmp_path / "zeros.txt") or tmp_path / "zeros.txt",
     "character device"),
    (lambda tmp_path, sock: Path("/dev/null"), "character device"),
    (lambda tmp_path, sock: sock, "socket"),
], ids=["link-to-dev-zero", "dev-null", "socket"])
def test_a_device_or_socket_is_refused_unopened(capsys, tmp_path, unix_socket, monkeypatch, make, kind):
    path = make(tmp_path, unix_socket)
    monkeypatch.setattr("builtins.open", lambda *args, **kwargs: pytest.fail(f"{args[0]} was opened"))
    assert cli_error(capsys, "compress", path) == f"{path} is a {kind}, not a document"
    with pytest.raises(UserError) as err:
        DocumentStore().load(path=str(path))
    assert str(err.value) == f"{path} is a {kind}, not a document"


def test_a_regular_file_is_read_whatever_its_size_says():
    """/proc files say they are 0 bytes long: the read is bounded by the limit, not by stat."""
    if not Path("/proc/version").is_file():
        pytest.skip("no /proc/version on this system")
    assert os.stat("/proc/version").st_size == 0
    assert app.ingest.read_file("/proc/version").startswith("Linux version")


@pytest.mark.slow
@pytest.mark.parametrize("names", [("Apache-2.0", "LICENSE-2.0", "notes.v2", "README")])
def test_names_that_are_not_extensions_are_read_as_text(capsys, tmp_path, tiny_checkpoint, names):
    for name in names:
        (tmp_path / name).write_text(DOC)
        code = main(["compress", str(tmp_path / name), "--checkpoint", str(tiny_checkpoint), "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert json.loads(out)["tokens"] > 0


# ---- pipes and standard input -------------------------------------------------------------------
def compressed_tokens(capsys, path, checkpoint) -> int:
    code = main(["compress", str(path), "--checkpoint", str(checkpoint), "--no-cache", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)["tokens"]


@pytest.mark.slow
def test_standard_input(capsys, doc, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(DOC.encode())))
    assert compressed_tokens(capsys, "-", tiny_checkpoint) == compressed_tokens(capsys, doc, tiny_checkpoint)


@pytest.mark.slow
def test_a_named_pipe(capsys, doc, tmp_path, tiny_checkpoint):
    fifo = tmp_path / "doc.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(DOC))
    writer.start()
    tokens = compressed_tokens(capsys, fifo, tiny_checkpoint)
    writer.join()
    assert tokens == compressed_tokens(capsys, doc, tiny_checkpoint)


def test_standard_input_over_the_limit_is_read_bounded(capsys, monkeypatch):
    endless = io.BytesIO(b"a" * (MAX_FILE_BYTES + 4096))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(endless))
    assert cli_error(capsys, "compress", "-") == "standard input is more than 52,428,800 bytes, the limit (50 MiB)"
    assert endless.tell() == MAX_FILE_BYTES + 1  # one byte past the limit, no more


@pytest.mark.slow
def test_process_substitution_and_redirected_stdin_in_a_shell(doc, tiny_checkpoint):
    """`compress <(cat doc)` and `compress - < doc` in bash, as a user types them."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = f"{sys.executable} -m app.cli compress"
    script = (f"{cli} <(cat {doc}) --checkpoint {tiny_checkpoint} --no-cache --json && "
              f"{cli} - --checkpoint {tiny_checkpoint} --no-cache --json < {doc}")
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    first, second = (json.loads(line) for line in done.stdout.splitlines())
    assert first["tokens"] == second["tokens"] > 0


def wait_channel(pid: int) -> str:
    """Where the kernel says process `pid` sleeps ("wait_for_partner": opening a pipe nobody writes)."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return ""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/wchan").exists(), reason="needs Linux's /proc/PID/wchan")
def test_ctrl_c_on_a_pipe_without_a_writer(tmp_path):
    """Waiting for a writer as `cat` does; Ctrl-C (SIGINT) ends it with one line, exit status 130."""
    fifo = tmp_path / "nobody-writes.fifo"
    os.mkfifo(fifo)
    # A terminal's Ctrl-C: SIGINT at its default in the child even where this run inherited it ignored
    # (a shell ignores SIGINT in the jobs it starts in the background, and Python then keeps ignoring it).
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "compress", str(fifo)], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120  # a bound on the wait only: nothing about time is asserted
    while wait_channel(process.pid) != "wait_for_partner":  # until it blocks opening the pipe
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the CLI never waited for a writer:\n{process.stderr.read()}")
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 130
    assert process.stderr.read() == "interrupted\n"


@pytest.mark.parametrize("text", ["", "   ", "\n\t\r\n \x00 "])
def test_empty_pasted_text(text):
    with pytest.raises(UserError, match=r"^the pasted text is empty or only whitespace$"):
        DocumentStore().load(text=text)


# ---- limits and choices --------------------------------------------------------------------------
def test_document_over_the_token_limit_names_both_sizes(capsys, doc, tiny_checkpoint, tiny_lclm_factory,
                                                         monkeypatch):
    tokens = len(tiny_lclm_factory().tokenize_document(DOC))
    assert tokens > 10
    monkeypatch.setenv("LCLM_STUDIO_MAX_TOKENS", "10")
    expected = f"the document has {tokens:,} tokens; the limit is 10 (set LCLM_STUDIO_MAX_TOKENS to change it)"
    assert cli_error(capsys, "compress", doc, "--checkpoint", tiny_checkpoint) == expected
    studio = Studio(Settings(max_document_tokens=10, device="cpu"), checkpoint=str(tiny_checkpoint))
    with pytest.raises(UserError) as err:
        studio.compress(DOC)
    assert str(err.value) == expected


@pytest.mark.slow
def test_no_library_warning_comes_before_the_error_line(tmp_path, tiny_checkpoint, tiny_lclm_factory):
    """A document longer than the tokenizer's model_max_length makes transformers warn "Token indices
    sequence length is longer than ..."; the user sees only our line, and nothing when it succeeds.
    (A real process: in-process, the library's handler writes past pytest's capture.)"""
    long_doc = tmp_path / "long.txt"
    long_doc.write_text(" ".join([DOC] * 40))
    tokens = len(tiny_lclm_factory().tokenize_document(long_doc.read_text()))
    assert tokens > tiny_lclm_factory().encoder_tokenizer.model_max_length

    def cli(*args, **env):
        return subprocess.run([sys.executable, "-m", "app.cli", "compress", str(long_doc), "--checkpoint",
                               str(tiny_checkpoint), "--no-cache", *args], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=300)

    refused = cli(LCLM_STUDIO_MAX_TOKENS="100")
    assert refused.returncode == 2
    assert [line for line in refused.stderr.splitlines() if not line.startswith("... ")] == [
        f"error: the document has {tokens:,} tokens; the limit is 100 (set LCLM_STUDIO_MAX_TOKENS to change it)"]
    done = cli("--json")
    assert done.returncode == 0 and json.loads(done.stdout)["tokens"] == tokens
    assert "Token indices" not in done.stderr and "warning" not in done.stderr.lower(), done.stderr


@pytest.mark.parametrize("question", ["", "   ", "\n\t"])
def test_empty_question(capsys, doc, question):
    assert cli_error(capsys, "ask", doc, "-q", question) == "the question is empty"


@pytest.mark.parametrize("ratio, pooling, message", [
    (5, "mean", "ratio must be one of 4, 8, 16, got 5"),
    ("16x", "mean", "ratio must be one of 4, 8, 16, got '16x'"),
    (4, "max", "pooling must be one of mean, concat, eos, got 'max'"),
])
def test_ratio_and_pooling_outside_the_allowed_set(ratio, pooling, message):
    """The services check the choice themselves: the page's radio buttons do not guard the API."""
    variant = Variant(CHECKPOINT_FAMILY, "unused", 4, "mean", trained=False)
    workspace = Workspace(Studio(Settings(device="cpu")), Catalog([variant]))
    with pytest.raises(UserError) as err:
        workspace.variant(CHECKPOINT_FAMILY, ratio, pooling)
    assert str(err.value) == message
    with pytest.raises(UserError) as err:
        workspace.studio.compress(DOC, ratio, pooling)
    assert str(err.value) == message
    assert workspace.variant(CHECKPOINT_FAMILY, "4", "mean") == variant  # a digit string is fine


def test_ratio_and_pooling_outside_the_allowed_set_in_the_cli(capsys, doc):
    """argparse refuses them before anything runs: its usage, then one error line, exit status 2."""
    for flag, value, message in (("--ratio", "5", "invalid choice: 5 (choose from 4, 8, 16)"),
                                 ("--pooling", "max", "invalid choice: 'max' (choose from 'mean', 'concat', 'eos')")):
        with pytest.raises(SystemExit) as exit_:
            main(["compress", str(doc), flag, value])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1] == f"lclm compress: error: argument {flag}: {message}", err


# ---- checkpoints -------------------------------------------------------------------------------
def test_checkpoint_that_does_not_exist(capsys, doc, tmp_path):
    missing = tmp_path / "no-such-model"
    assert cli_error(capsys, "compress", doc, "--checkpoint", missing) == \
        f"checkpoint {missing} not found: no such directory, and not a model hub id"


def test_checkpoint_that_is_a_file(capsys, doc, tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    assert cli_error(capsys, "compress", doc, "--checkpoint", weights) == \
        f"checkpoint {weights} is a file; expected a directory in the LCLM layout"


def test_checkpoint_not_in_the_published_layout(capsys, doc, tmp_path, tiny_checkpoint):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_checkpoint, partial)
    shutil.rmtree(partial / "encoder")
    assert cli_error(capsys, "compress", doc, "--checkpoint", partial) == \
        f"{partial} is not an LCLM checkpoint: {LAYOUT_HINT}"


@pytest.mark.parametrize("kind, pickle_name", [("decoder", "pytorch_model.bin"), ("encoder", "model.pt")])
def test_checkpoint_with_pickle_weights_is_refused_unread(capsys, doc, tmp_path, tiny_checkpoint, no_unpickling,
                                                          kind, pickle_name):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint, pickled)
    for weights in (pickled / kind).glob("*.safetensors"):
        weights.unlink()
    (pickled / kind / pickle_name).write_bytes(b"\x80\x04\x95 a pickle")
    assert cli_error(capsys, "compress", doc, "--checkpoint", pickled) == \
        f"{pickled / kind} holds pickle weights ({pickle_name}); only safetensors are loaded"


@pytest.mark.parametrize("weights", ["adapter/adapter.safetensors", "decoder/model.safetensors"])
def test_pickle_named_safetensors_is_refused_unread(capsys, doc, tmp_path, tiny_checkpoint, no_unpickling, weights):
    disguised = tmp_path / "disguised"
    shutil.copytree(tiny_checkpoint, disguised)
    (disguised / weights).write_bytes(b"\x80\x04\x95 a pickle with a safetensors name")
    message = cli_error(capsys, "compress", doc, "--checkpoint", disguised)
    assert re.fullmatch(rf"{re.escape(str(disguised / weights))} is not a readable safetensors file \(.+\)",
                        message), message
