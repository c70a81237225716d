"""The EXPAND agent, with the round structure of the paper's agent.

Every chunk of the document (model/chunking.py) is its own memory region, numbered from 1.
Each decision round the model replies `EXPAND: i, j` (those chunks are then shown as plain
text) or `ANSWER: ...`:
- the first round must expand: an answer given before any chunk was expanded is demoted to
  expanding the chunk numbers the reply mentions (at most 5), or chunk 1;
- the last directive in a reply wins (as in the authors' parser, `EXPAND:` counts when digits,
  commas or whitespace follow it, `ANSWER:` when anything does); the answer is the text after
  that last `ANSWER:`; numbers outside 1..K are dropped and reported; a reply with neither
  directive is taken whole as the answer;
- an EXPAND that names no new chunk ends the loop, and so does the last decision round
  (whose new chunks are not read, as in the authors' agent);
- unless a later round answered, one forced final round follows, told that no expansion
  rounds remain;
- a `Layout` may show consecutive chunks as one section (one label, one memory region) and cap
  the chunks read in full, so that every round fits the decoder's positions (a long document;
  app/engine/methods.py chooses it); chunk numbers past the cap are dropped and reported.
The prompt texts come from a prompt profile (model/prompts.py)."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from model.prompts import PROMPT_PROFILES, PromptProfile, Section, memory_region

DEFAULT_ROUNDS = 5
MAX_DEMOTED = 5  # chunks read when a first-round answer is demoted
ACTIONS = ("expand", "answer", "demoted", "forced")

DIRECTIVE = re.compile(r"(EXPAND|ANSWER)\s*:", re.IGNORECASE)
NUMBER_LIST = re.compile(r"[0-9,\s]+")  # what an EXPAND directive names: digits, commas, whitespace
MENTIONED = re.compile(r"\b[0-9]{1,3}\b")


@dataclass
class Reply:
    action: str  # "expand" or "answer"
    numbers: list[int] = field(default_factory=list)  # EXPAND: chunk numbers in 1..K, sorted, once each
    ignored: list[str] = field(default_factory=list)  # numbers dropped, with why
    answer: str = ""


def in_range(item: str, num_chunks: int) -> bool:
    """Whether the digits `item` name a chunk 1..num_chunks (no int() of a huge number)."""
    return len(item.lstrip("0")) <= len(str(num_chunks)) and 1 <= int(item) <= num_chunks


def parse_reply(text: str, num_chunks: int) -> Reply:
    """One model reply: the last EXPAND/ANSWER directive decides; no directive: all of it is the answer."""
    text = text.strip()
    directives = [d for d in DIRECTIVE.finditer(text) if (
        text[d.end():].strip() if d.group(1).upper() == "ANSWER" else NUMBER_LIST.match(text, d.end()))]
    if not directives:
        return Reply("answer", answer=text)
    last = directives[-1]
    if last.group(1).upper() == "ANSWER":
        return Reply("answer", answer=text[last.end():].strip())
    listed = NUMBER_LIST.match(text, last.end()).group(0)
    numbers, ignored = set(), []
    for item in re.findall(r"[0-9]+", listed):
        if in_range(item, num_chunks):
            numbers.add(int(item))
        elif f"{item}: no such chunk (1-{num_chunks})" not in ignored:
            ignored.append(f"{item}: no such chunk (1-{num_chunks})")
    return Reply("expand", sorted(numbers), ignored)


def mentioned_chunks(text: str, num_chunks: int) -> list[int]:
    """The chunks a demoted answer expands: the numbers of 1-3 digits it mentions that name a
    chunk, smallest first, at most MAX_DEMOTED; chunk 1 when it mentions none."""
    numbers = sorted({int(n) for n in MENTIONED.findall(text) if 1 <= int(n) <= num_chunks})
    return numbers[:MAX_DEMOTED] or [1]


@dataclass
class Round:
    number: int
    raw_output: str  # the reply, with any prefilled prefix
    action: str  # one of ACTIONS
    forced: str | None  # the reply prefix the round was prefilled with (studio profile), else None
    expanded: list[int]  # chunks (numbered from 1) this round added as plain text
    ignored: list[str]  # what the reply asked for and did not get, with why
    prompt_tokens: int = 0  # decoder positions of the round's prompt, placeholders and prefix included
    positions: int = 0  # the same number, under the name the other modes use

    def to_dict(self) -> dict:
        return asdict(self)


# generate(prompt_text, regions, assistant_prefix): a generator that may yield progress items
# (passed through) and returns (reply text after the prefix, decoder positions).
GenerateFn = Callable[[str, list[torch.Tensor], str], Generator[Any, None, tuple[str, int]]]


@dataclass(frozen=True)
class Layout:
    """How a round shows the chunks: `per_section` consecutive chunks under one label and in one
    memory region (1: each chunk its own), and at most `max_expanded` chunks in full (None: no limit)."""

    per_section: int = 1
    max_expanded: int | None = None

    def show(self, chunk_latents: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list]:
        """(the memory regions in order, the contexts a prompt profile shows for them)."""
        if self.per_section == 1:
            return list(chunk_latents), [memory_region(int(r.shape[0])) for r in chunk_latents]
        regions, sections = [], []
        for first in range(0, len(chunk_latents), self.per_section):
            members = chunk_latents[first : first + self.per_section]
            regions.append(torch.cat(list(members), dim=0))  # [sum M_i, dec_hidden]
            sections.append(Section(first + 1, first + len(members), memory_region(int(regions[-1].shape[0]))))
        return regions, sections

    def room(self, expanded: int) -> int:
        """How many more chunks may be read in full when `expanded` already are."""
        return sys.maxsize if self.max_expanded is None else max(0, self.max_expanded - expanded)


class ExpandAgent:
    def __init__(self, max_rounds: int = DEFAULT_ROUNDS, profile: str | PromptProfile = "paper"):
        if max_rounds < 1:
            raise ValueError("max_rounds must be at least 1")
        self.max_rounds = max_rounds
        self.profile = PROMPT_PROFILES[profile] if isinstance(profile, str) else profile

    def run(self, question: str, chunk_latents: Sequence[torch.Tensor], chunk_texts: Sequence[str],
            generate: GenerateFn, layout: Layout | None = None) -> Generator[Any, None, str]:
        """Yields what `generate` yields plus one `Round` after each round; returns the answer.
        `chunk_latents[i]` ([M_i, dec_hidden]) and `chunk_texts[i]` are chunk number i + 1.
        `layout` (default: every chunk labelled, no limit) says how many chunks share a label and
        how many chunks may be read in full, so that every round fits the decoder's positions."""
        count = len(chunk_latents)
        layout = layout or Layout()
        regions, contexts = layout.show(chunk_latents)
        expanded: dict[int, str] = {}  # chunk number -> text, shown as plain text

        def ask(prompt: str, prefix: str):
            raw, positions = yield from generate(prompt, regions, prefix)
            return prefix + raw, positions

        number = 0
        for number in range(1, self.max_rounds + 1):
            rounds_left = self.max_rounds - number  # decision rounds after this one
            prefix = "" if expanded else self.profile.first_reply_prefix
            text, positions = yield from ask(
                self.profile.expand_round(contexts, expanded, question, rounds_left), prefix)
            reply = parse_reply(text, count)
            if reply.action == "answer" and not expanded:  # no answer before something was read
                demoted = mentioned_chunks(text, count)[:layout.room(0)]
                expanded.update({n: chunk_texts[n - 1] for n in demoted})
                yield Round(number, text, "demoted", prefix or None, demoted, [], positions, positions)
                if rounds_left == 0:
                    break
                continue
            if reply.action == "answer":
                yield Round(number, text, "answer", prefix or None, [], [], positions, positions)
                return reply.answer
            new = [n for n in reply.numbers if n not in expanded]
            ignored = reply.ignored + [f"{n}: already expanded" for n in reply.numbers if n in expanded]
            room = layout.room(len(expanded))
            ignored += [f"{n}: no room left in the decoder's positions" for n in new[room:]]
            new = new[:room]
            if rounds_left == 0:
                ignored += [f"{n}: no expansion rounds left" for n in new]
                new = []
            yield Round(number, text, "expand", prefix or None, new, ignored, positions, positions)
            if not new:
                break
            expanded.update({n: chunk_texts[n - 1] for n in new})
        prefix = self.profile.final_reply_prefix
        text, positions = yield from ask(self.profile.final_round(contexts, expanded, question), prefix)
        reply = parse_reply(text, count)
        yield Round(number + 1, text, "forced", prefix or None, [], [], positions, positions)
        return reply.answer if reply.action == "answer" else text.strip()
