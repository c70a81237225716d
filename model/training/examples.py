"""Training examples and their loss masks.

Every objective produces a `Sample`: decoder input ids in which each memory region is
`<|memory_start|>` + one `<|memory|>` placeholder per latent + `<|memory_end|>`, labels
(IGNORE where no loss is taken), and the encoder token ids of the compressed documents.
Prompts come from model/prompts.py, the same texts inference uses.

Objectives (registered in OBJECTIVES, mixed by sampling weight per micro-batch):
- interleaved: compressed and plain spans alternate in one sequence; next-token loss on
  the plain tokens only (memory placeholders and their two tags are masked).
- reconstruction: compress a span; the decoder repeats it verbatim after the prompt.
- task: synthetic long-context tasks and EXPAND-agent rounds (stage 3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from model.agent import DEFAULT_ROUNDS
from model.chunking import chunk_text
from model.encoder import count_latents
from model.prompts import MEMORY, MEMORY_END, MEMORY_START, PROMPT_PROFILES, memory_region, reconstruction_prompt
from model.training.data.shards import vocab_hash
from model.training.data.synthetic import expand_transcript, gather_haystack, make_task

IGNORE = -100


@dataclass
class Sample:
    objective: str
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken; HF convention (the model shifts)
    documents: list[list[int]] = field(default_factory=list)  # encoder ids of each compressed document
    regions: list[tuple[int, int, int]] = field(default_factory=list)  # (document, latent start, latent end)
    # a teacher's distribution at each label position ([T][k] token ids, [T][k] log-probabilities), for
    # distillation; None: cross-entropy on the labels
    soft: tuple[list[list[int]], list[list[float]]] | None = None

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError("input_ids and labels differ in length")
        if self.soft is not None and len(self.soft[0]) != self.label_count:
            raise ValueError("soft targets and label positions differ in number")

    @property
    def label_count(self) -> int:
        """Positions that carry a loss."""
        return sum(1 for t in self.labels if t != IGNORE)

    @property
    def tokens(self) -> int:
        """Tokens processed: decoder positions plus encoder tokens."""
        return len(self.input_ids) + sum(len(d) for d in self.documents)


@dataclass
class Batch:
    objective: str
    input_ids: torch.Tensor  # [B, L], right-padded
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L]
    documents: list[list[int]]
    regions: list[tuple[int, int, int]]  # in row-major order of the placeholders
    tokens: int


def collate(samples: Sequence[Sample], pad_id: int) -> Batch:
    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    documents, regions = [], []
    for row, s in enumerate(samples):
        input_ids[row, : len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[row, : len(s.labels)] = torch.tensor(s.labels)
        attention_mask[row, : len(s.input_ids)] = 1
        regions += [(len(documents) + d, a, b) for d, a, b in s.regions]
        documents += s.documents
    return Batch(samples[0].objective, input_ids, attention_mask, labels, documents, regions,
                 sum(s.tokens for s in samples))


class ExampleBuilder:
    """Turns token spans and tasks into Samples for one LCLM (its tokenizers, ratio, window, chat format)."""

    def __init__(self, lclm):
        self.lclm = lclm
        self.config = lclm.config
        self.dec = lclm.decoder_tokenizer
        self.enc = lclm.encoder_tokenizer
        vocab = self.dec.get_vocab()
        self.memory_start, self.memory, self.memory_end = vocab[MEMORY_START], vocab[MEMORY], vocab[MEMORY_END]
        self.end_of_turn = vocab.get("<|im_end|>", self.dec.eos_token_id)
        # the same vocabulary (memory tokens aside): corpus ids (decoder tokenizer) serve the encoder as they are
        self.shared_vocab = vocab_hash(self.enc) == vocab_hash(self.dec)

    def latents(self, num_tokens: int) -> int:
        return count_latents(num_tokens, self.config.encoder_window_size, self.config.compression_ratio)

    def to_encoder(self, decoder_ids: list[int]) -> list[int]:
        if self.shared_vocab:
            return list(decoder_ids)
        return self.enc(self.dec.decode(decoder_ids), add_special_tokens=False)["input_ids"]

    def encode_text(self, text: str) -> list[int]:
        return self.enc(text, add_special_tokens=False)["input_ids"]

    def region_ids(self, num_latents: int) -> list[int]:
        return [self.memory_start] + [self.memory] * num_latents + [self.memory_end]

    # ---- interleaved next-token sequences ---------------------------------------------
    def interleaved(self, raw: list[int], spans: Sequence[tuple[str, int]]) -> Sample:
        """raw: decoder ids; spans: ("text" | "memory", length) covering `raw` in order.
        Memory spans become regions (masked, tags included); text spans carry the loss."""
        if sum(n for _, n in spans) != len(raw):
            raise ValueError("spans must cover the raw tokens exactly")
        ids, labels, documents, regions, at = [], [], [], [], 0
        for kind, n in spans:
            piece = raw[at : at + n]
            at += n
            if kind == "text":
                ids += piece
                labels += piece
            elif kind == "memory":
                enc = self.to_encoder(piece)
                k = self.latents(len(enc))
                regions.append((len(documents), 0, k))
                documents.append(enc)
                ids += self.region_ids(k)
                labels += [IGNORE] * (k + 2)
            else:
                raise ValueError(f"unknown span kind {kind!r}")
        return Sample("interleaved", ids, labels, documents, regions)

    # ---- chat-format examples ---------------------------------------------------------
    def chat(self, objective: str, prompt: str, reply_ids: list[int], documents: list[list[int]],
             regions: list[tuple[int, int, int]], end: bool = True, soft=None) -> Sample:
        """`prompt` (user turn, with one memory_region per region) in the chat format, then the
        reply and (with `end`) the end-of-turn token; loss on the reply and end-of-turn only."""
        prompt_ids = self.prompt_ids(prompt)
        placeholders = sum(1 for t in prompt_ids if t == self.memory)
        if placeholders != sum(b - a for _, a, b in regions):
            raise ValueError("prompt placeholders do not match the regions' latents")
        target = list(reply_ids) + ([self.end_of_turn] if end else [])
        return Sample(objective, prompt_ids + target, [IGNORE] * len(prompt_ids) + target, documents, regions, soft)

    def prompt_ids(self, prompt: str) -> list[int]:
        """Decoder ids of one user turn in the chat format, ready for the reply."""
        return self.dec(self.lclm.chat(prompt), add_special_tokens=False)["input_ids"]

    def question(self, context: str, question: str, reply_ids: list[int], profile: str = "studio",
                 objective: str = "qa", soft=None) -> Sample:
        """A question over `context` compressed into one memory region (as the studio's LCLM
        answer reads it), in a prompt profile's words."""
        enc = self.encode_text(context)
        k = self.latents(len(enc))
        prompt = PROMPT_PROFILES[profile].question(memory_region(k), question)
        return self.chat(objective, prompt, reply_ids, [enc], [(0, 0, k)], soft=soft)

    def reconstruction(self, raw: list[int]) -> Sample:
        """Compress `raw` (decoder ids); the reply is the same ids verbatim."""
        enc = self.to_encoder(raw)
        k = self.latents(len(enc))
        return self.chat("reconstruction", reconstruction_prompt(memory_region(k)), raw, [enc], [(0, 0, k)])

    def task(self, context: str, question: str, reply: str) -> Sample:
        return self.question(context, question, self.dec(reply, add_special_tokens=False)["input_ids"],
                             objective="task")

    def expand_rounds(self, context: str, question: str, answers_at: list[int], reply: str,
                      chunk_tokens: int, profile: str = "studio", objective: str = "task",
                      rounds: int = DEFAULT_ROUNDS) -> list[Sample]:
        """The EXPAND agent's rounds on one document, as in inference (model/agent.py, `rounds`
        decision rounds at most): the chunks of model/chunking.py, each chunk's text encoded on its
        own as one region, numbered from 1; expanded chunks appear as text; the prompts are the
        profile's. The first round expands the chunks holding the answers, the second answers."""
        from model.training.data.synthetic import TaskExample

        chunks = chunk_text(context, self.dec, chunk_tokens)
        spans = [(c.start_char, c.end_char) for c in chunks]
        documents = [self.encode_text(c.text) for c in chunks]
        regions = [(i, 0, self.latents(len(ids))) for i, ids in enumerate(documents)]
        contexts = [memory_region(k) for _, _, k in regions]
        example = TaskExample("expand", context, question, [reply], 0.0, answers_at)
        transcript = expand_transcript(example, spans)  # chunk indices from 0
        samples = []
        ask = PROMPT_PROFILES[profile].expand_round
        for number, (rnd, after) in enumerate(zip(transcript, transcript[1:] + [None]), start=1):
            text = rnd.reply
            if after is not None:  # an EXPAND reply names chunks by number from 1, as the prompt does
                text = "EXPAND: " + ", ".join(str(i + 1) for i in after.expanded if i not in rnd.expanded)
            prompt = ask(contexts, {i + 1: chunks[i].text for i in rnd.expanded}, question, rounds - number)
            reply_ids = self.dec(text, add_special_tokens=False)["input_ids"]
            samples.append(self.chat(objective, prompt, reply_ids, documents, regions))
        return samples


# ---- objectives: how each draws a sample ------------------------------------------------------
def plan_spans(total: int, rng: np.random.Generator, memory_fraction: float,
               span_tokens: tuple[int, int]) -> list[tuple[str, int]]:
    """Alternating ("memory" | "text", length) spans covering `total` tokens, about
    `memory_fraction` of them compressed; the first span's kind is drawn."""
    low, high = span_tokens
    spans, at = [], 0
    kind = "memory" if rng.random() < 0.5 else "text"
    while at < total:
        memory_len = int(rng.integers(low, high + 1))
        if kind == "memory":
            n = memory_len
        else:
            n = max(1, int(memory_len * (1 - memory_fraction) / memory_fraction * rng.uniform(0.5, 1.5)))
        n = min(n, total - at)
        if kind == "memory" and n < low:  # a tail too short to compress stays plain text
            kind = "text"
        if spans and spans[-1][0] == kind:
            spans[-1] = (kind, spans[-1][1] + n)
        else:
            spans.append((kind, n))
        at += n
        kind = "text" if kind == "memory" else "memory"
    if not any(k == "memory" for k, _ in spans):  # every sequence compresses something (FSDP runs the encoder)
        head = max(1, total // 2)
        spans = [("memory", head)] + ([("text", total - head)] if total > head else [])
    return spans


DrawFn = Callable[[int], list[int]]  # tokens wanted -> a corpus window of up to that many decoder ids


class Objective:
    name: str = ""

    def sample(self, builder: ExampleBuilder, draw: DrawFn, rng: np.random.Generator, run) -> list[Sample]:
        raise NotImplementedError


class Interleaved(Objective):
    name = "interleaved"

    def sample(self, builder, draw, rng, run):
        s = run.interleaved
        raw = draw(s.seq_tokens)
        return [builder.interleaved(raw, plan_spans(len(raw), rng, s.memory_fraction, s.span_tokens))]


class Reconstruction(Objective):
    name = "reconstruction"

    def sample(self, builder, draw, rng, run):
        low, high = run.reconstruction.span_tokens
        return [builder.reconstruction(draw(int(rng.integers(low, high + 1))))]


class Task(Objective):
    """A synthetic task on a haystack of corpus text, as a question or as EXPAND-agent rounds."""

    name = "task"

    def sample(self, builder, draw, rng, run):
        s = run.task
        names = sorted(s.tasks)
        weights = np.array([s.tasks[n] for n in names], dtype=float)
        name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        context_tokens = int(rng.integers(s.context_tokens[0], s.context_tokens[1] + 1))
        seed = int(rng.integers(0, 2**62))
        haystack = gather_haystack(lambda: builder.dec.decode(draw(3 * context_tokens)),
                                   lambda t: len(builder.encode_text(t)), context_tokens)
        if haystack is None:
            raise RuntimeError("the corpus gave no usable haystack text in 20 windows")
        example = make_task(name, seed, haystack, context_tokens)
        if rng.random() < s.expand_share:
            rounds = builder.expand_rounds(example.context, example.question, example.answer_offsets, example.reply,
                                           s.chunk_tokens)
            return [rounds[int(rng.integers(len(rounds)))]]
        return [builder.task(example.context, example.question, example.reply)]


OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (Interleaved, Reconstruction, Task)}
