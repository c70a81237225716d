"""Bad input through the CLI and the services: each one is a single exact `error: ...` line
on stderr with exit status 2 (no traceback), or the same UserError from the services."""

import re
import shutil

import pytest

from app.catalog import CHECKPOINT_FAMILY, Catalog, Variant
from app.cli import main
from app.documents import DocumentStore
from app.ingest import MAX_FILE_BYTES
from app.service import Studio
from app.settings import Settings
from app.workspace import Workspace
from model.errors import UserError
from tests.bad_files import BAD_FILES

DOC = ("Alpha beta gamma delta. The vault code is 5521. " * 12).strip()
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
    monkeypatch.setattr(type(path), "read_bytes", lambda self: pytest.fail("an oversized file was read"))
    assert cli_error(capsys, "compress", path) == "huge.txt is 52,428,801 bytes; the limit is 52,428,800 bytes (50 MiB)"


def test_missing_file_and_directory(capsys, tmp_path):
    assert cli_error(capsys, "compress", tmp_path / "missing.txt") == f"{tmp_path / 'missing.txt'}: no such file"
    assert cli_error(capsys, "compress", tmp_path) == f"{tmp_path} is a directory, not a document"


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
        assert err.splitlines()[-1] == f"python -m app.cli compress: error: argument {flag}: {message}", err


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
