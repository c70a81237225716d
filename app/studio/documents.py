"""Documents of the studio: a process-wide store keyed by sha256 (so that a session keeps
only the id) and a document's layout under one model: tokens, encoder windows and chunks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.engine.lru import BoundedLRU
from app.ingest import clean_text, read_file
from cache import document_sha256
from model.errors import UserError

PREVIEW_CHARS = 160


@dataclass(frozen=True)
class Document:
    sha256: str
    text: str
    name: str  # file name, or "pasted text"


class DocumentStore:
    """Least-recently-used documents in memory, bounded by count and total characters."""

    def __init__(self, max_documents: int = 64, max_chars: int = 64 * 2**20):
        self.max_documents = max_documents
        self.max_chars = max_chars
        self._documents: BoundedLRU[str, Document] = BoundedLRU(max_documents, max_chars, lambda d: len(d.text))

    def add(self, text: str, name: str = "pasted text") -> Document:
        document = Document(document_sha256(text), text, name)
        self._documents.put(document.sha256, document)  # the newest is kept even when alone over max_chars
        return document

    def get(self, sha256: str | None) -> Document:
        document = self._documents.get(sha256 or "")
        if document is None:
            raise UserError("no document loaded: paste text or upload a file on the Document tab first")
        return document

    def load(self, text: str | None = None, path: str | None = None) -> Document:
        """A document from an uploaded file (when given) or from pasted text."""
        if path:
            return self.add(read_file(path), Path(path).name)
        return self.add(clean_text(text or "", "the pasted text"))


@dataclass(frozen=True)
class Cell:
    """One chunk of the document strip."""

    index: int  # the chunk's number, from 1
    tokens: int  # decoder tokens
    start_char: int
    end_char: int
    preview: str


@dataclass(frozen=True)
class Layout:
    """How one model sees a document."""

    tokens: int
    windows: int
    window_size: int
    latents: int
    ratio: int
    cells: tuple[Cell, ...]

    @property
    def chunks(self) -> int:
        return len(self.cells)


def preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def layout(studio, model, text: str) -> Layout:
    """Tokens and encoder windows of `text` under `model` (its encoder tokenizer), and its EXPAND
    chunks (the decoder's tokenizer)."""
    document = studio.tokenize(model, text)
    config = model.config
    chunks = studio.store.chunks(model, text)
    cells = [Cell(c.number, c.tokens, c.start_char, c.end_char, preview(c.text)) for c in chunks]
    return Layout(
        tokens=len(document), windows=-(-len(document) // config.encoder_window_size),
        window_size=config.encoder_window_size, latents=model.count_latents(len(document)),
        ratio=config.compression_ratio, cells=tuple(cells),
    )
