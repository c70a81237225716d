"""Bad input through the studio's API (gradio_client against `python app.py`): each request is
refused with its exact message, the upload is gone, and the next good request still works."""

import os
import re
import stat
from pathlib import Path

import httpx
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError

from app.ingest import MAX_FILE_BYTES
from tests.bad_files import BAD_FILES
from tests.studio.conftest import DOCUMENT

pytestmark = pytest.mark.server

MODEL = ("--checkpoint", 4, "mean")  # family, ratio, pooling
RATIO_CHOICES = "Value: 5 (type: <class 'int'>) is not in the list of choices: [4, 8, 16]"
POOLING_CHOICES = "Value: 'max' (type: <class 'str'>) is not in the list of choices: ['mean', 'concat', 'eos']"


def refused(call, *args, api_name: str) -> str:
    """The message of the error the app answers `call(*args)` with."""
    with pytest.raises(AppError) as err:
        call(*args, api_name=api_name)
    return str(err.value)


def still_works(client) -> None:
    """The app is up and this session can go on: a good document loads and compresses."""
    text, _, summary, _, _ = client.predict(DOCUMENT, None, *MODEL, api_name="/load_document")
    assert text == DOCUMENT.strip() and "tokens in" in summary
    assert client.predict(*MODEL, api_name="/compress")[1]["latents"] > 0


def upload_dir(studio_server):
    (directory,) = studio_server.temp_root.glob("lclm-studio-uploads-*")
    return directory


def files_in(directory) -> list:
    return [p for p in directory.rglob("*") if p.is_file()]


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[name for name, _, _ in BAD_FILES])
def test_bad_upload(client, studio_server, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    assert refused(client.predict, "", handle_file(str(path)), *MODEL, api_name="/upload_document") == message
    assert not [p for p in files_in(upload_dir(studio_server)) if p.name == name]  # deleted, though refused
    still_works(client)


@pytest.mark.parametrize("name", ["Apache-2.0", "LICENSE-2.0", "notes.v2", "README"])
def test_names_that_are_not_extensions_upload_as_text(client, tmp_path, name):
    path = tmp_path / name
    path.write_text(DOCUMENT)
    text, _, summary, _, _ = client.predict("", handle_file(str(path)), *MODEL, api_name="/upload_document")
    assert text == DOCUMENT.strip() and f"**{name}**" in summary


def test_upload_over_the_size_limit(client, studio_url, tmp_path):
    path = tmp_path / "huge.txt"
    with path.open("wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(ValueError) as err:  # the client reads the limit from the app and does not send it
        client.predict("", handle_file(str(path)), *MODEL, api_name="/upload_document")
    assert str(err.value) == f"File {path} exceeds the maximum file size of 52428800 bytes set in  component."
    with path.open("rb") as f:  # a client that sends it anyway
        response = httpx.post(f"{studio_url.rstrip('/')}/gradio_api/upload", files={"files": ("huge.txt", f)},
                              timeout=120)
    assert response.status_code == 413
    assert response.text == "File size exceeded maximum allowed size of 52428800 bytes."
    still_works(client)


@pytest.mark.parametrize("text", ["", "   \n\t  "])
def test_empty_pasted_text(client, text):
    message = refused(client.predict, text, None, *MODEL, api_name="/load_document")
    assert message == "the pasted text is empty or only whitespace"
    still_works(client)


def test_document_over_the_token_limit(client):
    text = "The quick brown fox jumps over the lazy dog. " * 15_000
    message = refused(client.predict, text, None, *MODEL, api_name="/load_document")
    match = re.fullmatch(r"the document has ([\d,]+) tokens; the limit is 131,072 "
                         r"\(set LCLM_STUDIO_MAX_TOKENS to change it\)", message)
    assert match and int(match.group(1).replace(",", "")) > 131_072, message
    still_works(client)


def test_no_document_and_empty_question(client):
    assert refused(client.predict, *MODEL, api_name="/compress") == \
        "no document loaded: paste text or upload a file on the Document tab first"
    still_works(client)
    for question in ("", "  \n "):
        assert refused(client.predict, *MODEL, question, "lclm", False, "none", 4, api_name="/ask") == \
            "the question is empty"
    still_works(client)


@pytest.mark.parametrize("ratio, pooling, message", [(5, "mean", RATIO_CHOICES), (4, "max", POOLING_CHOICES)])
def test_ratio_and_pooling_outside_the_allowed_set(client, ratio, pooling, message):
    """Gradio's own check answers first; the services check again (tests/test_bad_input.py)."""
    client.predict(DOCUMENT, None, *MODEL, api_name="/load_document")
    assert refused(client.predict, "--checkpoint", ratio, pooling, api_name="/compress") == message
    assert refused(client.predict, "--checkpoint", ratio, pooling, "Why?", "lclm", False, "none", 4,
                   api_name="/ask") == message
    still_works(client)


def test_an_upload_is_deleted_once_read_from_a_private_directory(client, studio_server, studio_url, tmp_path):
    directory = upload_dir(studio_server)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    path = tmp_path / "notes.md"
    path.write_text("# Notes\n\n" + DOCUMENT)
    text, *_ = client.predict("", handle_file(str(path)), *MODEL, api_name="/upload_document")
    assert text.startswith("# Notes")
    assert not [p for p in files_in(directory) if p.name == "notes.md"]
    with path.open("rb") as f:  # where an upload lands before an event reads it
        (landed,) = httpx.post(f"{studio_url.rstrip('/')}/gradio_api/upload",
                               files={"files": ("unread.md", f)}, timeout=60).json()
    assert Path(landed).parent.parent == directory and Path(landed).is_file()
