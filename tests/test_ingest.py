"""Document ingest: each bad input gives one clear UserError; good files give clean text."""

import codecs

import pytest

from app.ingest import MAX_FILE_BYTES, clean_text, read_bytes, read_file
from model.errors import UserError
from tests.bad_files import SUPPORTED


def test_text_file_is_cleaned(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"line one  \r\nline two\r\n\r\n")
    assert read_file(path) == "line one\nline two"


@pytest.mark.parametrize("content", [b"", b"   \n\t\n  "])
def test_empty_or_blank_document_is_refused(tmp_path, content):
    path = tmp_path / "blank.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match="blank.txt is empty or only whitespace"):
        read_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_file(tmp_path / "nope.txt")


def test_directory_is_not_a_document(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        read_file(tmp_path)


def test_binary_file_is_refused():
    with pytest.raises(UserError, match=r"^image.txt is a binary file, not text$"):
        read_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image.txt")


def test_undecodable_bytes_are_refused_not_replaced():
    with pytest.raises(UserError, match=r"not valid UTF-8 text \(undecodable byte at offset 3\)"):
        read_bytes(b"caf\xe9 au lait", "latin1.txt")


def test_utf8_bom_and_utf16_are_decoded():
    assert read_bytes(codecs.BOM_UTF8 + "héllo".encode(), "a.txt") == "héllo"
    assert read_bytes("héllo wörld".encode("utf-16"), "b.txt") == "héllo wörld"


def test_unsupported_extension():
    with pytest.raises(UserError, match=r"unsupported file type \.exe"):
        read_bytes(b"MZ\x90\x00\x03\x00\x00\x00", "tool.exe")


def test_oversized_file():
    with pytest.raises(UserError, match="the limit is"):
        read_bytes(b"a" * (MAX_FILE_BYTES + 1), "big.txt")


def test_html_keeps_text_and_drops_scripts():
    markup = b"<html><head><style>p{}</style></head><body><h1>Title</h1><p>First &amp; second</p>" \
             b"<script>alert(1)</script><p>Third</p></body></html>"
    text = read_bytes(markup, "page.html")
    assert "Title" in text and "First & second" in text and "Third" in text
    assert "alert" not in text and "p{}" not in text


def test_broken_pdf_is_refused():
    with pytest.raises(UserError, match="is not a readable PDF"):
        read_bytes(b"%PDF-1.4 this is not really a pdf", "broken.pdf")


def test_pdf_text_is_extracted():
    pypdf = pytest.importorskip("pypdf")
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = pypdf.PdfWriter()
    page = writer.add_blank_page(width=300, height=200)
    font = DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
                             NameObject("/BaseFont"): NameObject("/Helvetica")})
    page[NameObject("/Resources")] = DictionaryObject(
        {NameObject("/Font"): DictionaryObject({NameObject("/F1"): writer._add_object(font)})})
    stream = DecodedStreamObject()
    stream.set_data(b"BT /F1 12 Tf 20 100 Td (Hello from a PDF) Tj ET")
    page[NameObject("/Contents")] = writer._add_object(stream)
    import io

    buffer = io.BytesIO()
    writer.write(buffer)
    assert read_bytes(buffer.getvalue(), "doc.pdf") == "Hello from a PDF"


def test_image_only_pdf_is_refused():
    pypdf = pytest.importorskip("pypdf")
    import io

    writer = pypdf.PdfWriter()
    writer.add_blank_page(width=100, height=100)
    buffer = io.BytesIO()
    writer.write(buffer)
    with pytest.raises(UserError, match="no extractable text"):
        read_bytes(buffer.getvalue(), "scan.pdf")


def test_clean_text_drops_nul_and_normalises_newlines():
    assert clean_text("a\x00b\rc") == "ab\nc"


def test_encrypted_pdf_is_refused():
    pypdf = pytest.importorskip("pypdf")
    import io

    writer = pypdf.PdfWriter()
    writer.add_blank_page(width=100, height=100)
    writer.encrypt(user_password="secret", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    with pytest.raises(UserError, match=r"^secret.pdf is an encrypted PDF; decrypt it first$"):
        read_bytes(buffer.getvalue(), "secret.pdf")


# ---- the content decides the kind; the name is a hint ------------------------------------------
@pytest.mark.parametrize("name", ["Apache-2.0", "LICENSE-2.0", "notes.v2", "README", "data.exe"])
def test_text_is_text_whatever_the_name(name):
    assert read_bytes(b"Licensed under the terms below.\n", name) == "Licensed under the terms below."


@pytest.mark.parametrize("name", ["page", "page.txt", "page.2"])
def test_an_html_page_is_read_as_html_whatever_the_name(name):
    markup = b"<!-- saved -->\n<!DOCTYPE html><html><body><p>Kept</p><script>dropped()</script></body></html>"
    assert read_bytes(markup, name) == "Kept"


def test_the_html_name_is_a_hint_for_text_without_a_signature():
    assert read_bytes(b"<p>One</p><p>Two</p>", "fragment.html") == "One\n\nTwo"
    assert read_bytes(b"<p>One</p><p>Two</p>", "fragment.md") == "<p>One</p><p>Two</p>"  # Markdown may hold tags


def test_a_pdf_is_read_as_a_pdf_whatever_the_name():
    pdf = b"%PDF-1.4 this is not really a pdf"
    for name in ("report", "report.txt", "report-v1.0"):
        with pytest.raises(UserError, match=rf"^{name} is not a readable PDF"):
            read_bytes(pdf, name)


@pytest.mark.parametrize("data, name, message", [
    (b"PK\x03\x04\x14\x00\x08\x00", "notes.txt", "notes.txt is a binary file, not text"),  # a zip named .txt
    (b"\x1f\x8b\x08\x08\xab\xcd\xef\x12", "notes", "notes is a binary file, not text"),  # gzip, no NUL at its start
    (b"\x7fELF\x02\x01\x01\x00", "LICENSE-2.0", "LICENSE-2.0 is a binary file, not text"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "photo.png", f"photo.png: unsupported file type .png; supported: {SUPPORTED}"),
    (b"PK\x03\x04\x14\x00\x06\x00", "letter.docx", f"letter.docx: unsupported file type .docx; supported: {SUPPORTED}"),
], ids=["zip-named-txt", "gzip", "elf", "png", "docx"])
def test_what_is_not_a_document_is_refused(data, name, message):
    with pytest.raises(UserError) as err:
        read_bytes(data, name)
    assert str(err.value) == message
