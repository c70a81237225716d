"""Cutting a document into EXPAND chunks, as the paper's agent does: at most C tokens of the
*decoder's* tokenizer per chunk, packed from whole sentences (a sentence ends after `.`, `!`
or `?` followed by whitespace). A sentence longer than C tokens (code, logs, tables) is cut
every C tokens instead of becoming one huge chunk.

Chunks are character spans of the document, numbered from 1, in order, never overlapping,
with no leading or trailing whitespace; what lies between two chunks is whitespace only.
Each chunk's token count is that of its own text tokenized alone, and never exceeds C
(except for a single token that alone tokenizes to more than C, which cannot be cut)."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_CHUNK_TOKENS = 256  # the authors' needle runs (they swept 128 / 256 / 512 / 1024)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Chunk:
    number: int  # from 1, as the prompt, the transcript and the UI show it
    start_char: int  # span [start_char, end_char) of the document text
    end_char: int
    tokens: int  # decoder tokens of `text` tokenized alone
    text: str

    def to_dict(self) -> dict:
        return {"index": self.number, "start_char": self.start_char, "end_char": self.end_char,
                "tokens": self.tokens}


class _Counter:
    """Decoder-token counts of spans of one text."""

    def __init__(self, text: str, tokenizer):
        self.text = text
        self.tokenizer = tokenizer

    def count(self, start: int, end: int) -> int:
        # verbose=False: a long span is only counted, never fed to a model whole
        return len(self.tokenizer(self.text[start:end], add_special_tokens=False, verbose=False)["input_ids"])

    def counts(self, spans: list[tuple[int, int]]) -> list[int]:
        if not spans:
            return []
        ids = self.tokenizer([self.text[a:b] for a, b in spans], add_special_tokens=False, verbose=False)["input_ids"]
        return [len(i) for i in ids]


def strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    """[start, end) without its leading and trailing whitespace (empty: start == end)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Non-empty, stripped spans of the sentences of `text`, in order."""
    bounds, start = [], 0
    for gap in SENTENCE_END.finditer(text):
        bounds.append((start, gap.start()))
        start = gap.end()
    bounds.append((start, len(text)))
    spans = [strip_span(text, a, b) for a, b in bounds]
    return [(a, b) for a, b in spans if a < b]


def cut_span(counter: _Counter, start: int, end: int, max_tokens: int) -> list[tuple[int, int, int]]:
    """A span longer than `max_tokens` cut into pieces of at most that many tokens:
    (start, end, tokens) each, stripped, in order."""
    text = counter.text
    offsets = counter.tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True,
                                verbose=False)["offset_mapping"]
    token_ends = [start + e for _, e in offsets]  # char end of each token, non-decreasing
    pieces, at, first = [], start, 0
    while True:
        at, _ = strip_span(text, at, end)
        if at >= end:
            return pieces
        while first < len(token_ends) and token_ends[first] <= at:
            first += 1  # the first token that ends after `at`
        take = max_tokens
        while True:
            last = first + take - 1
            cut = token_ends[last] if last < len(token_ends) - 1 else end
            a, b = strip_span(text, at, cut)
            tokens = counter.count(a, b)
            if tokens <= max_tokens or take == 1:
                break
            take = max(1, take - (tokens - max_tokens))  # alone, the piece tokenized longer: take fewer
        if a < b:
            pieces.append((a, b, tokens))
        at = cut


def chunk_text(text: str, tokenizer, max_tokens: int = DEFAULT_CHUNK_TOKENS) -> list[Chunk]:
    """`text` cut into chunks of at most `max_tokens` decoder tokens on sentence boundaries."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be positive")
    counter = _Counter(text, tokenizer)
    start, end = strip_span(text, 0, len(text))
    if start == end:
        return []
    whole = counter.count(start, end)
    if whole <= max_tokens:
        return [Chunk(1, start, end, whole, text[start:end])]
    sentences = sentence_spans(text)
    pieces: list[tuple[int, int, int]] = []  # (start, end, tokens alone), each at most max_tokens
    for (a, b), tokens in zip(sentences, counter.counts(sentences)):
        pieces += [(a, b, tokens)] if tokens <= max_tokens else cut_span(counter, a, b, max_tokens)
    chunks: list[Chunk] = []
    i = 0
    while i < len(pieces):
        j, total = i + 1, pieces[i][2]
        while j < len(pieces) and total + pieces[j][2] <= max_tokens:
            total += pieces[j][2]
            j += 1
        a = pieces[i][0]
        tokens = counter.count(a, pieces[j - 1][1]) if j - i > 1 else pieces[i][2]
        while tokens > max_tokens:  # the text between sentences added tokens: give sentences back
            j -= 1
            tokens = counter.count(a, pieces[j - 1][1]) if j - i > 1 else pieces[i][2]
        b = pieces[j - 1][1]
        chunks.append(Chunk(len(chunks) + 1, a, b, tokens, text[a:b]))
        i = j
    return chunks
