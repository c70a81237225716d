"""Prompt texts shared by inference, evaluation and training, kept in one place."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MEMORY_START = "<|memory_start|>"
MEMORY = "<|memory|>"
MEMORY_END = "<|memory_end|>"
MEMORY_TOKENS = (MEMORY_START, MEMORY, MEMORY_END)

# Chat format of the released (Qwen3 instruct) decoder; used when a tokenizer has no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


QUESTION_MARK = "\x00QUESTION\x00"  # put after the document in a prompt to split it there (prefix reuse, presses)


def memory_region(num_latents: int) -> str:
    """Inline text of one memory region: start tag, one placeholder per latent, end tag."""
    return MEMORY_START + MEMORY * num_latents + MEMORY_END


def question_prompt(context: str, question: str) -> str:
    """The studio's question over a document; `context` is raw text or a memory region."""
    return f"Answer the question using the document.\n\nDocument:\n{context}\n\nQuestion: {question.strip()}"


def reconstruction_prompt(context: str) -> str:
    """Ask the decoder to reproduce the text behind a memory region verbatim (the studio's own
    wording; the authors publish no reconstruction prompt)."""
    return f"{context}\n\nRepeat the text above exactly."


@dataclass(frozen=True)
class Section:
    """Chunks `first`..`last` (numbered from 1) shown under one label as one memory region: how an
    EXPAND round shows a document with more chunks than the decoder's positions can label one by one."""

    first: int
    last: int
    context: str  # one memory region holding every latent of these chunks, in order

    @property
    def label(self) -> str:
        return f"Chunk {self.first}" if self.first == self.last else f"Chunks {self.first}-{self.last}"


ChunkContexts = Sequence["str | Section"]  # one context per chunk (numbered from 1), or sections


def chunk_lines(chunk_contexts: ChunkContexts) -> tuple[list[str], int]:
    """The lines that show the compressed chunks ("Chunk 3: <region>" or "Chunks 41-48: <region>")
    and how many chunks they cover."""
    sections = [c if isinstance(c, Section) else Section(n, n, c) for n, c in enumerate(chunk_contexts, start=1)]
    return [f"{s.label}: {s.context}" for s in sections], (sections[-1].last if sections else 0)


def expand_prompt(chunk_contexts: ChunkContexts, expanded: dict[int, str], question: str) -> str:
    """The studio's EXPAND prompt: every chunk compressed (or every section of chunks), expanded
    chunks in full below. `expanded` maps a chunk number (from 1) to its text."""
    shown, count = chunk_lines(chunk_contexts)
    grouped = "" if count == len(shown) else f" (in {len(shown)} sections)"
    lines = [f"The document is split into {count} chunks, each shown in compressed form{grouped}."]
    lines += shown
    if expanded:
        lines.append("\nFull text of expanded chunks:")
        for number in sorted(expanded):
            lines.append(f"### Chunk {number}\n{expanded[number]}")
    lines.append(f"\nQuestion: {question.strip()}")
    lines.append(
        'To read chunks in full, reply "EXPAND: i, j" with their numbers. '
        'When you can answer, reply "ANSWER: " followed by the answer.'
    )
    return "\n".join(lines)


# ---- prompt profiles: the texts around the document, the question and the EXPAND rounds ----------
class PromptProfile:
    """How questions and EXPAND rounds are put to the decoder. `first_reply_prefix` and
    `final_reply_prefix` are prefilled at the start of the first and the forced final reply."""

    name = ""
    summary = ""
    first_reply_prefix = ""
    final_reply_prefix = ""

    def question(self, context: str, question: str) -> str:
        """One question over `context` (raw text or a memory region)."""
        raise NotImplementedError

    def expand_round(self, chunk_contexts: ChunkContexts, expanded: dict[int, str], question: str,
                     rounds_left: int) -> str:
        """A decision round: every chunk as a memory region, the expanded ones (number from 1 ->
        text) as plain text, and `rounds_left` expansion rounds after this one."""
        raise NotImplementedError

    def final_round(self, chunk_contexts: ChunkContexts, expanded: dict[int, str], question: str) -> str:
        """The forced last round: the model must answer."""
        raise NotImplementedError


class PaperPrompts(PromptProfile):
    """The layout of the paper's agent and evaluation (the order, headers, rules and directives
    the authors use), in this project's words."""

    name = "paper"
    summary = "the paper's prompt layout (published checkpoints)"

    def question(self, context: str, question: str) -> str:
        return f"{context}\n\n{question.strip()}"

    def expand_round(self, chunk_contexts, expanded, question, rounds_left):
        shown, count = chunk_lines(chunk_contexts)
        parts = ["[Compressed document, one memory region per chunk]" if count == len(shown) else
                 f"[Compressed document: {count} chunks, one memory region per section of consecutive chunks]"]
        parts += shown
        parts.append("")
        if expanded:
            parts.append("[Expanded chunks, as plain text]")
            for number in sorted(expanded):
                parts += [expanded[number].strip(), ""]
        parts += [f"Question: {question.strip()}", ""]
        parts.append(self._later_rules(rounds_left) if expanded else self._first_rules(rounds_left))
        return "\n".join(parts)

    def final_round(self, chunk_contexts, expanded, question):
        return (self.expand_round(chunk_contexts, expanded, question, rounds_left=0)
                + "\n\nThere are no expansion rounds left. Reply now with `ANSWER: <your final answer>`.")

    NOTES = (
        "- 'Chunk N' is only an index for EXPAND, not part of the document. If the answer names a label "
        "that the document itself uses (such as 'Paragraph N' or 'Section X'), copy it from the expanded text; "
        "never answer with a chunk number.\n"
        "- For a multiple-choice question, give only the letter (A / B / C / D / E).\n"
        "- For a summary, write the summary itself, with no preamble."
    )

    def _first_rules(self, rounds_left: int) -> str:
        return (
            "Every chunk above is compressed (lossy). That view shows what the document covers, but it cannot "
            "be trusted for exact strings: numbers, codes, UUIDs, hashes, names, code and any verbatim text "
            "longer than about 8 characters come out slightly wrong.\n\n"
            "RULE: this is the first round. You must EXPAND at least one chunk before you ANSWER. Choose the "
            "chunks most likely to hold what the question needs; naming several at once is encouraged.\n\n"
            f"NOTES FOR THE ANSWER (in a later round):\n{self.NOTES}\n\n"
            f"You have {rounds_left} expansion round(s) left after this one.\n\n"
            "Reply with one line:\n"
            "  EXPAND: <comma-separated chunk numbers>"
        )

    def _later_rules(self, rounds_left: int) -> str:
        return (
            "Every chunk above is compressed (lossy); to read a chunk's exact characters you must EXPAND it. "
            "The chunks expanded so far are shown in full under [Expanded chunks, as plain text].\n\n"
            "RULE, exact answers: if the answer must be copied verbatim (a UUID, hash, ID, name, code, quotation, "
            "anything over about 8 characters or not a dictionary word) and the expanded text does not contain "
            "it yet, EXPAND more chunks instead of guessing from the compressed view, which gets such strings "
            "almost right but not exactly.\n\n"
            "Do not EXPAND when the compressed view already answers the question (the topic, yes or no, a count, "
            "a classification), or when the chunks that matter are already expanded.\n\n"
            "When you EXPAND, name every chunk that could plausibly hold the answer: reading five candidates now "
            "costs less than a wrong answer.\n\n"
            f"NOTES FOR THE ANSWER:\n{self.NOTES}\n\n"
            f"You have {rounds_left} expansion round(s) left after this one.\n\n"
            "Reply with exactly one of these lines:\n"
            "  EXPAND: <comma-separated chunk numbers>     (read more chunks)\n"
            "  ANSWER: <your final answer>                 (commit to an answer)"
        )


class StudioPrompts(PromptProfile):
    """The studio's own short prompts, the ones the training recipe (model/training) teaches the
    embedded model; the first reply is prefilled with `EXPAND:` and the forced last with `ANSWER:`."""

    name = "studio"
    summary = "the studio's short prompts (the embedded model, trained on them)"
    first_reply_prefix = "EXPAND:"
    final_reply_prefix = "ANSWER:"

    def question(self, context: str, question: str) -> str:
        return question_prompt(context, question)

    def expand_round(self, chunk_contexts, expanded, question, rounds_left):
        return expand_prompt(chunk_contexts, expanded, question)

    def final_round(self, chunk_contexts, expanded, question):
        return expand_prompt(chunk_contexts, expanded, question)


PROMPT_PROFILES: dict[str, PromptProfile] = {p.name: p for p in (PaperPrompts(), StudioPrompts())}


def default_prompt_profile(checkpoint_id: str) -> str:
    """`studio` for the embedded model (trained on the studio's prompts), `paper` for any other
    checkpoint (the published LCLMs were trained on the authors' layout)."""
    return "studio" if checkpoint_id.startswith("embedded:") else "paper"
