"""Long real inputs for the tests: text from this machine's own documentation
(`bench.long_document.machine_text`: the licence texts and the packages' copyright files) and a
PDF of many pages made of it, built in code with pypdf."""

from __future__ import annotations

import io
import textwrap

import pytest

from bench.long_document import machine_text

LINES_PER_PAGE = 50
CHARS_PER_LINE = 90


def long_text(tokens: int, tokenizer=None) -> str:
    """About `tokens` tokens of the machine's documentation (exactly, with `tokenizer`); the test
    is skipped where the machine has none (not a Debian system)."""
    try:
        return machine_text(tokens, tokenizer)
    except SystemExit as missing:
        pytest.skip(str(missing))


def pdf_of(text: str, pages: int) -> tuple[bytes, list[str]]:
    """A PDF of `pages` pages of `text`'s lines (wrapped, Latin-1, Helvetica), and the lines it holds."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    lines = [piece for line in text.encode("latin-1", "replace").decode("latin-1").splitlines()
             for piece in textwrap.wrap(line, CHARS_PER_LINE)]
    lines = lines[: pages * LINES_PER_PAGE]
    if len(lines) < pages * LINES_PER_PAGE:
        raise ValueError(f"{len(lines)} lines fill fewer than {pages} pages")
    writer = PdfWriter()
    font = writer._add_object(DictionaryObject({
        NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
        NameObject("/BaseFont"): NameObject("/Helvetica")}))
    for first in range(0, len(lines), LINES_PER_PAGE):
        page = writer.add_blank_page(width=612, height=792)
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})})
        shown = [b"(" + line.encode("latin-1").replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")
                 + b") Tj 0 -14 Td" for line in lines[first : first + LINES_PER_PAGE]]
        stream = DecodedStreamObject()
        stream.set_data(b"BT /F1 9 Tf 36 756 Td " + b" ".join(shown) + b" ET")
        page[NameObject("/Contents")] = writer._add_object(stream)
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue(), lines
