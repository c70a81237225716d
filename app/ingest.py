"""Document ingest: a file or pasted text -> clean text, or one clear UserError."""

from __future__ import annotations

import codecs
import html.parser
import io
import logging
import re
from pathlib import Path

from model.errors import UserError

TEXT_SUFFIXES = {"", ".txt", ".md", ".markdown", ".rst", ".log", ".csv", ".json", ".xml", ".tex"}
HTML_SUFFIXES = {".html", ".htm"}
PDF_SUFFIXES = {".pdf"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES
MAX_FILE_BYTES = 50 * 1024 * 1024


def clean_text(text: str, source: str = "the document") -> str:
    """Normalise newlines, drop NULs and trailing spaces; refuse empty or blank text."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
    if not text.strip():
        raise UserError(f"{source} is empty or only whitespace")
    return text


def decode_bytes(data: bytes, source: str) -> str:
    """UTF-8 (with or without BOM) or BOM-marked UTF-16/32. Anything else is refused, not
    decoded with replacement characters, so that no text is silently changed."""
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        encoding = "utf-32"
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    else:
        if b"\x00" in data[:8192]:
            raise UserError(f"{source} is a binary file, not text")
        encoding = "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        raise UserError(
            f"{source} is not valid UTF-8 text (undecodable byte at offset {err.start}); save it as UTF-8 and retry"
        ) from None


class _HTMLText(html.parser.HTMLParser):
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre", "table"}
    SKIP = {"script", "style", "noscript", "template", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def html_to_text(markup: str, source: str = "the page") -> str:
    parser = _HTMLText()
    try:
        parser.feed(markup)
        parser.close()
    except (AssertionError, ValueError) as err:  # html.parser gives up on some malformed markup
        raise UserError(f"{source} is not readable HTML ({err})") from None
    text = "".join(parser.parts)
    text = re.sub(r"[ \t]+", " ", text)
    return re.sub(r"\n\s*\n+", "\n\n", text)


def pdf_to_text(data: bytes, source: str) -> str:
    try:
        from pypdf import PdfReader
    except ImportError:  # pragma: no cover - pypdf is in requirements.txt
        raise UserError("reading PDF files needs the pypdf package") from None
    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its repair warnings would add stray lines on stderr
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise UserError(f"{source} is an encrypted PDF; decrypt it first")
        pages = [page.extract_text() or "" for page in reader.pages]
    except (UserError, MemoryError):
        raise
    except Exception as err:  # pypdf raises many kinds of error on malformed input
        raise UserError(f"{source} is not a readable PDF ({type(err).__name__})") from None
    text = "\n\n".join(p for p in pages if p.strip())
    if not text.strip():
        raise UserError(f"{source} has no extractable text (a scanned, image-only PDF?)")
    return text


def check_size(size: int, source: str) -> None:
    if size > MAX_FILE_BYTES:
        raise UserError(f"{source} is {size:,} bytes; the limit is {MAX_FILE_BYTES:,} bytes "
                        f"({MAX_FILE_BYTES // 2**20} MiB)")


def read_bytes(data: bytes, name: str) -> str:
    """Text of an uploaded or read file, by its name's extension."""
    source = Path(name).name or "the file"
    suffix = Path(name).suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        supported = ", ".join(sorted(s for s in SUPPORTED_SUFFIXES if s))
        raise UserError(f"{source}: unsupported file type {suffix}; supported: {supported}")
    check_size(len(data), source)
    if suffix in PDF_SUFFIXES:
        text = pdf_to_text(data, source)
    else:
        text = decode_bytes(data, source)
        if suffix in HTML_SUFFIXES:
            text = html_to_text(text, source)
    return clean_text(text, source)


def read_file(path: str | Path) -> str:
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a document")
    try:
        size = path.stat().st_size
        check_size(size, path.name)
        data = path.read_bytes()
    except PermissionError:
        raise UserError(f"{path}: permission denied") from None
    return read_bytes(data, path.name)
