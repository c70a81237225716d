"""Document ingest: a file, a pipe, standard input or pasted text -> clean text, or one clear UserError.

The kind of a document (PDF, HTML or plain text) comes from its content; the file name is only a
hint (a text file named .html is read as HTML). Only regular files and pipes are read, and never
more than MAX_FILE_BYTES + 1 bytes, whatever their size claims.
"""

from __future__ import annotations

import codecs
import io
import logging
import os
import re
import stat
import sys
from pathlib import Path

from model.errors import UserError
from model.html_text import html_to_text

TEXT_SUFFIXES = {"", ".txt", ".md", ".markdown", ".rst", ".log", ".csv", ".json", ".xml", ".tex"}
HTML_SUFFIXES = {".html", ".htm"}
PDF_SUFFIXES = {".pdf"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES
MAX_FILE_BYTES = 50 * 1024 * 1024
STDIN = "-"  # the path that means standard input
# Starts of files that are not documents (archives, compressed data, images, executables) whose
# first bytes need not hold a NUL; every other binary file is told by the NULs it holds.
BINARY_SIGNATURES = (
    b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b"\xfd7zXZ\x00", b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07",
    b"\x28\xb5\x2f\xfd", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\x7fELF", b"\xcf\xfa\xed\xfe",
    b"\xce\xfa\xed\xfe", b"\xca\xfe\xba\xbe",
)
UTF_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
HTML_START = re.compile(r"\s*(<!--.*?-->\s*)*<(!doctype\s+html|html|head|body)[\s>]", re.IGNORECASE | re.DOTALL)


def clean_text(text: str, source: str = "the document") -> str:
    """Normalise newlines, drop NULs and trailing spaces; refuse empty or blank text."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
    if not text.strip():
        raise UserError(f"{source} is empty or only whitespace")
    return text


def is_binary(data: bytes) -> bool:
    """Whether `data` is not text at all: a known non-document signature, or NULs in its first
    8 KiB (BOM-marked UTF-16/32 text holds NULs and is text)."""
    if data.startswith(UTF_BOMS):
        return False
    return data.startswith(BINARY_SIGNATURES) or b"\x00" in data[:8192]


def is_pdf(data: bytes) -> bool:
    return data[:1024].lstrip().startswith(b"%PDF-")


def looks_like_html(text: str) -> bool:
    """Whether `text` begins as an HTML page does (a doctype, <html>, <head> or <body>)."""
    return HTML_START.match(text[:4096]) is not None


def decode_bytes(data: bytes, source: str) -> str:
    """UTF-8 (with or without BOM) or BOM-marked UTF-16/32. Anything else is refused, not
    decoded with replacement characters, so that no text is silently changed."""
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        encoding = "utf-32"
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    else:
        encoding = "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        raise UserError(
            f"{source} is not valid UTF-8 text (undecodable byte at offset {err.start}); save it as UTF-8 and retry"
        ) from None


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


def is_extension(suffix: str) -> bool:
    """Whether a name's suffix names a file type (".exe", ".docx"), not a version (".0", ".2-rc1")."""
    return re.fullmatch(r"\.[a-z][a-z0-9]{0,7}", suffix) is not None


def read_bytes(data: bytes, name: str, source: str | None = None) -> str:
    """Text of an uploaded or read file: its kind from its content, its name a hint (HTML for a
    text file named .html or .htm). `source` names it in messages (default: the file name)."""
    source = source or Path(name).name or "the file"
    suffix = Path(name).suffix.lower()
    check_size(len(data), source)
    if is_pdf(data):
        return clean_text(pdf_to_text(data, source), source)
    if is_binary(data):
        if is_extension(suffix) and suffix not in SUPPORTED_SUFFIXES:
            supported = ", ".join(sorted(s for s in SUPPORTED_SUFFIXES if s))
            raise UserError(f"{source}: unsupported file type {suffix}; supported: {supported}")
        raise UserError(f"{source} is a binary file, not text")
    text = decode_bytes(data, source)
    if suffix in HTML_SUFFIXES or looks_like_html(text):
        text = html_to_text(text, source)
    return clean_text(text, source)


def file_kind(mode: int) -> str:
    """What a stat mode describes, in words."""
    for test, kind in ((stat.S_ISREG, "regular file"), (stat.S_ISFIFO, "pipe"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"


def read_bounded(stream, source: str) -> bytes:
    """All of `stream`, refused once it passes MAX_FILE_BYTES (at most one byte more is read)."""
    data = stream.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise UserError(f"{source} is more than {MAX_FILE_BYTES:,} bytes, the limit "
                        f"({MAX_FILE_BYTES // 2**20} MiB)")
    return data


def read_file(path: str | Path) -> str:
    """Text of the document at `path`: a regular file, a pipe (`<(cmd)`, a FIFO) or "-" for standard
    input. A pipe is read until its writer closes it, as `cat` does. Directories, devices and sockets
    are refused unopened; a regular file over the size limit is refused unread."""
    if str(path) == STDIN:
        return read_bytes(read_bounded(sys.stdin.buffer, "standard input"), "", "standard input")
    path = Path(path).expanduser()
    try:
        info = path.stat()  # follows links: a link to /dev/zero is a device
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as err:
        raise UserError(f"{path}: {err.strerror.lower() if err.strerror else err}") from None
    kind = file_kind(info.st_mode)
    if kind not in ("regular file", "pipe"):
        raise UserError(f"{path} is a {kind}, not a document")
    source = path.name if kind == "regular file" else str(path)
    if kind == "regular file":
        check_size(info.st_size, source)
    try:
        with open(path, "rb") as stream:
            opened = file_kind(os.fstat(stream.fileno()).st_mode)
            if opened != kind:  # replaced between the two looks
                raise UserError(f"{path} is a {opened}, not a document")
            data = read_bounded(stream, source)
    except PermissionError:
        raise UserError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a document") from None
    return read_bytes(data, path.name, source)
