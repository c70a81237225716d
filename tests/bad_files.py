"""Files a user may hand the studio that it cannot read, each with the one-sentence message
the CLI and the UI show for it. PDFs are built in code with pypdf."""

from __future__ import annotations

import io

SUPPORTED = ".csv, .htm, .html, .json, .log, .markdown, .md, .pdf, .rst, .tex, .txt, .xml"


def blank_pdf(password: str | None = None) -> bytes:
    """A one-page PDF with no text (what a scan without OCR looks like), encrypted when a password is given."""
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(width=200, height=200)
    if password is not None:
        writer.encrypt(user_password=password, algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def broken_pdf() -> bytes:
    """A PDF cut off half way, as an interrupted download leaves it."""
    data = blank_pdf()
    return data[: len(data) // 2]


# (file name, content, message): read_file(name) raises UserError(message), exactly
BAD_FILES = [
    ("empty.txt", b"", "empty.txt is empty or only whitespace"),
    ("blank.md", b"  \n\t\r\n   \n", "blank.md is empty or only whitespace"),
    ("blob.txt", bytes(range(256)), "blob.txt is a binary file, not text"),
    ("latin.txt", "café crème".encode("latin-1"),
     "latin.txt is not valid UTF-8 text (undecodable byte at offset 3); save it as UTF-8 and retry"),
    ("broken.pdf", broken_pdf(), "broken.pdf is not a readable PDF (PdfStreamError)"),
    ("secret.pdf", blank_pdf(password="secret"), "secret.pdf is an encrypted PDF; decrypt it first"),
    ("scan.pdf", blank_pdf(), "scan.pdf has no extractable text (a scanned, image-only PDF?)"),
    ("page.html", b"<p>Hi</p><![foo[ bar",
     "page.html is not readable HTML (unknown status keyword 'foo' in marked section)"),
    ("empty.html", b"<html><script>var x;</script></html>", "empty.html is empty or only whitespace"),
    ("tool.exe", b"MZ\x90\x00", f"tool.exe: unsupported file type .exe; supported: {SUPPORTED}"),
]
