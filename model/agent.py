"""The EXPAND agent: every chunk of the document is its own memory region; each round the
model replies `EXPAND: i, j` (the raw text of those chunks is added) or `ANSWER: ...`.
The first round must expand and the last must answer (both forced by prefilling the reply)."""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from model.prompts import expand_prompt, memory_region


@dataclass(frozen=True)
class Chunk:
    index: int
    start: int  # encoder token range [start, end)
    end: int
    latent_start: int  # latent range [latent_start, latent_end) in the document's latents
    latent_end: int


def chunk_size(chunk_tokens: int, window: int, ratio: int) -> int:
    """Chunk length in tokens: a multiple of the window when at least one window long,
    else a multiple of the ratio, so chunks never split a latent's group."""
    if chunk_tokens >= window:
        return max(1, round(chunk_tokens / window)) * window
    return max(1, chunk_tokens // ratio) * ratio


def make_chunks(num_tokens: int, chunk_tokens: int, window: int, ratio: int) -> list[Chunk]:
    """Cut T tokens into chunks of about `chunk_tokens` that never cross an encoder window
    (for chunks shorter than a window) or split one (for longer chunks)."""
    size = chunk_size(chunk_tokens, window, ratio)
    bounds: list[tuple[int, int]] = []
    if size >= window:
        bounds = [(s, min(s + size, num_tokens)) for s in range(0, num_tokens, size)]
    else:
        for w_start in range(0, num_tokens, window):
            w_end = min(w_start + window, num_tokens)
            bounds += [(s, min(s + size, w_end)) for s in range(w_start, w_end, size)]
    chunks, latent = [], 0
    for index, (start, end) in enumerate(bounds):
        # latents of [start, end): groups of `ratio` restart at each window boundary
        count = sum(
            -(-(min(end, w + window) - max(start, w)) // ratio)
            for w in range(start - start % window, end, window)
        )
        chunks.append(Chunk(index, start, end, latent, latent + count))
        latent += count
    return chunks


@dataclass
class Reply:
    action: str  # "expand", "answer" or "invalid"
    indices: list[int] = field(default_factory=list)  # valid, new chunk ids to expand
    ignored: list[str] = field(default_factory=list)  # what was asked for and not honoured, with why
    answer: str = ""


ACTION = re.compile(r"\b(EXPAND|ANSWER)\s*[:(]?", re.IGNORECASE)


def parse_reply(text: str, num_chunks: int, expanded: Sequence[int] = ()) -> Reply:
    """Parse one model reply. The first EXPAND/ANSWER keyword decides; indices that are out
    of range, repeated or already expanded are ignored and reported."""
    match = ACTION.search(text)
    if not match:
        return Reply("invalid", ignored=["no EXPAND or ANSWER in the reply"])
    rest = text[match.end():]
    if match.group(1).upper() == "ANSWER":
        return Reply("answer", answer=rest.strip())
    line = rest.split("\n", 1)[0]
    indices, ignored = [], []
    for item in re.findall(r"[^\s,;()\[\]]+", line):
        item = item.strip(".")
        if item.lower() in ("and", "chunk", "chunks", "expand", ""):
            continue
        if not re.fullmatch(r"[0-9]+", item):
            ignored.append(f"{item!r}: not a chunk number")
        elif len(item.lstrip("0")) > len(str(num_chunks)) or int(item) >= num_chunks:  # no int() of huge numbers
            ignored.append(f"{item}: no such chunk (0-{num_chunks - 1})" if num_chunks else f"{item}: no such chunk")
        elif int(item) in expanded:
            ignored.append(f"{item}: already expanded")
        elif int(item) in indices:
            ignored.append(f"{item}: repeated")
        else:
            indices.append(int(item))
    if not indices:
        return Reply("invalid", ignored=ignored or ["EXPAND named no chunk"])
    return Reply("expand", indices=indices, ignored=ignored)


@dataclass
class Round:
    number: int
    raw_output: str
    action: str
    forced: str | None  # the reply prefix the round was forced to start with
    expanded: list[int]
    ignored: list[str]
    positions: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


# generate(prompt_text, regions, assistant_prefix): a generator that may yield progress items
# (passed through) and returns (raw reply text, decoder positions).
GenerateFn = Callable[[str, list[torch.Tensor], str], Generator[Any, None, tuple[str, int]]]


class ExpandAgent:
    def __init__(self, max_rounds: int = 5):
        if max_rounds < 2:
            raise ValueError("max_rounds must be at least 2")
        self.max_rounds = max_rounds

    def run(self, question: str, chunk_latents: Sequence[torch.Tensor], chunk_texts: Sequence[str],
            generate: GenerateFn) -> Generator[Any, None, str]:
        """Yields what `generate` yields plus one `Round` after each round; returns the answer."""
        expanded: dict[int, str] = {}
        regions = list(chunk_latents)
        contexts = [memory_region(int(r.shape[0])) for r in regions]
        must_answer = False
        for number in range(1, self.max_rounds + 1):
            if number == 1:
                forced = "EXPAND:"
            elif number == self.max_rounds or must_answer or len(expanded) == len(regions):
                forced = "ANSWER:"
            else:
                forced = None
            prefix = forced or ""
            raw, positions = yield from generate(expand_prompt(contexts, expanded, question), regions, prefix)
            reply = parse_reply(prefix + raw, len(regions), list(expanded))
            yield Round(number, prefix + raw, reply.action, forced, reply.indices, reply.ignored, positions)
            if reply.action == "answer":
                return reply.answer
            if reply.action == "expand":
                expanded.update({i: chunk_texts[i] for i in reply.indices})
            else:
                must_answer = True  # a reply that is neither: the next round must answer
        raise AssertionError("unreachable: the last round is forced to answer")
