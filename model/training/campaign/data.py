"""A step's samples (StepData) of each objective, every micro-batch a pure function of (seed,
split, step): CampaignData, the question objectives (QUESTION_OBJECTIVES) and the fixed
held-back validation spans.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model.chunking import DEFAULT_CHUNK_TOKENS
from model.generation import stop_token_ids
from model.prompts import PROMPT_PROFILES, reconstruction_prompt
from model.training.campaign.recipes import VALIDATION_SPAN, VALIDATION_SPANS, Recipe
from model.training.data.corpus import stable_hash
from model.training.data.questions import Question, draw, make_question, right
from model.training.data.shards import Split
from model.training.data.synthetic import Haystack, gather_haystack
from model.training.examples import ExampleBuilder, Sample, plan_spans
from model.training.teacher import TeacherCache, TeacherReply


@dataclass
class StepData:
    """One training step's samples, all of one objective."""

    objective: str
    samples: list[Sample]
    span_tokens: int = 0  # reconstruction span length of a curriculum phase (0: other objectives)
    # interleaved objectives: each sample's raw decoder ids and its ("memory" | "text", length) spans
    sources: list[tuple[list[int], list[tuple[str, int]]]] = field(default_factory=list)


def weighted_choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    """A key of `weights` drawn with probability proportional to its value (keys in sorted order)."""
    names = sorted(weights)
    shares = np.array([weights[n] for n in names])
    return names[int(rng.choice(len(names), p=shares / shares.sum()))]


class CampaignData:
    """Samples of each objective; every micro-batch a pure function of (seed, split, step) (the
    teacher's replies, which some objectives read, are cached in `teacher`)."""

    def __init__(self, builder: ExampleBuilder, corpus, recipe: Recipe, seed: int,
                 teacher: TeacherCache | None = None, autocast: bool = False):
        self.builder, self.corpus, self.recipe, self.seed = builder, corpus, recipe, seed
        self.teacher = teacher or TeacherCache()
        self.autocast = autocast
        self.stops = stop_token_ids(builder.dec, builder.lclm.decoder)

    def split(self, name: str) -> Split:
        split = self.corpus[name]
        return split if split.num_tokens else self.corpus["train"]

    @staticmethod
    def exact(split: Split, rng: np.random.Generator, length: int) -> list[int]:
        """A window of exactly `length` tokens (documents shorter than that are skipped)."""
        for _ in range(1000):
            window = split.window(rng, length)
            if len(window) == length:
                return window
        raise ValueError(f"the corpus has no document of {length} tokens")

    def step(self, step: int, span_tokens_done: int, objective: str | None = None) -> StepData:
        """The samples of training step `step` (of `objective`, else one the recipe draws)."""
        r = self.recipe
        rng = np.random.default_rng(stable_hash(f"campaign:{self.seed}:{objective or 'train'}:{step}"))
        objective = objective or weighted_choice(rng, r.objectives)
        train = self.split("train")
        if objective in QUESTION_OBJECTIVES:
            return QUESTION_OBJECTIVES[objective](self, rng, step)
        if objective == "reconstruction_facts":
            span = r.phase(span_tokens_done).span_tokens
            return StepData(objective, [self.builder.reconstruction(self.fact_span(rng, step * 16 + j, span))
                                        for j in range(max(1, r.batch_tokens // span))], span)
        if objective == "reconstruction_long":
            count = max(1, r.batch_tokens // r.long_span)
            return StepData(objective, [self.builder.reconstruction(self.exact(train, rng, r.long_span))
                                        for _ in range(count)], r.long_span)
        if objective == "reconstruction":
            if r.reconstruction_range is not None:
                low, high = r.reconstruction_range
                lengths = [int(rng.integers(low, high + 1)) for _ in range(max(1, r.batch_tokens // high))]
                return StepData(objective, [self.builder.reconstruction(self.exact(train, rng, n)) for n in lengths])
            span = r.phase(span_tokens_done).span_tokens
            count = max(1, r.batch_tokens // span)
            return StepData(objective, [self.builder.reconstruction(self.exact(train, rng, span))
                                        for _ in range(count)],
                            span)
        sources = []
        for _ in range(max(1, r.batch_tokens // r.interleaved_tokens)):
            raw = self.exact(train, rng, r.interleaved_tokens)
            sources.append((raw, plan_spans(len(raw), rng, 0.5, r.interleaved_spans)))
        return StepData(objective, [self.builder.interleaved(raw, spans) for raw, spans in sources], sources=sources)

    # ---- question objectives --------------------------------------------------------------
    def haystack(self, rng: np.random.Generator, tokens: int, split: str = "train") -> Haystack:
        """Filler sentences of 2x `tokens` tokens from windows of 3x `tokens` corpus tokens of `split`."""
        haystack = gather_haystack(lambda: self.builder.dec.decode(self.split(split).window(rng, 3 * tokens)),
                                   self.count, tokens)
        if haystack is None or sum(haystack.tokens) < 2 * tokens:
            raise RuntimeError("the corpus gave no usable haystack text in 20 windows")
        return haystack

    def count(self, text: str) -> int:
        """Encoder tokens of a text (what a context's length is measured in)."""
        return len(self.builder.encode_text(text))

    def question(self, rng: np.random.Generator, index: int, lengths: tuple[int, ...] | None = None) -> Question:
        """Training case `index` (questions.draw), on a haystack drawn from the training split; where
        a haystack cannot hold the case (too few distinct sentences), the next draw of the index."""
        for attempt in range(8):
            kind, tokens, seed = draw(self.seed, index + attempt * 1_000_003, lengths or self.recipe.question_lengths,
                                      self.recipe.question_kinds)
            try:
                return make_question(kind, seed, self.haystack(rng, tokens), tokens, self.count)
            except ValueError:
                continue
        raise RuntimeError(f"no question case could be made for index {index} in 8 draws")

    def fact_span(self, rng: np.random.Generator, index: int, length: int) -> list[int]:
        """`length` decoder tokens of training question `index`'s document that hold its first answer
        whole, at a random place in the span (the exact digits a look-up must read back)."""
        case = self.question(rng, index)
        encoded = self.builder.dec(case.context, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        start_char = case.answer_offsets[0]
        end_char = start_char + len(case.answers[0])
        first = next(i for i, (a, b) in enumerate(offsets) if b > start_char)
        last = next((i for i, (a, b) in enumerate(offsets) if b >= end_char), len(ids) - 1)
        if len(ids) <= length:
            return ids
        low = max(0, last + 1 - length)  # the span's first token: the answer's last token inside it
        high = min(first, len(ids) - length)  # ... and its first token inside it
        begin = int(rng.integers(low, max(low, high) + 1))
        return ids[begin:begin + length]

    def profile(self, rng: np.random.Generator) -> str:
        return weighted_choice(rng, self.recipe.profiles)

    def teacher_reply(self, prompt_ids: list[int]) -> TeacherReply:
        return self.teacher.reply(self.builder.lclm.decoder, prompt_ids, self.recipe.teacher_tokens, self.stops,
                                  self.autocast)

    def per_step(self, rng: np.random.Generator, lengths: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        """(cases, their one length) of a step: as many as fill `question_tokens`."""
        length = int(rng.choice(lengths))
        return max(1, self.recipe.question_tokens // length), (length,)

    def qa_step(self, rng: np.random.Generator, step: int) -> StepData:
        """Questions over compressed documents. The target is the base decoder's own reply to the
        same question over the raw text (its distribution at each position) where that reply is
        right and ends; otherwise, and always where the recipe's `qa_target` is "reference", the
        reference answer (cross-entropy on the answer's own tokens)."""
        count, lengths = self.per_step(rng, self.recipe.question_lengths)
        samples = []
        for j in range(count):
            case = self.question(rng, step * 16 + j, lengths)
            profile = self.profile(rng)
            if self.recipe.qa_target == "reference":
                reply = self.builder.dec(case.reply, add_special_tokens=False)["input_ids"]
                samples.append(self.builder.question(case.context, case.question, reply, profile))
                continue
            taught = self.teacher_reply(self.builder.prompt_ids(PROMPT_PROFILES[profile].question(case.context,
                                                                                                  case.question)))
            text = self.builder.dec.decode(taught.ids)
            if taught.stopped and right(case, text):
                samples.append(self.builder.question(case.context, case.question, taught.ids, profile,
                                                     soft=(taught.top_ids, taught.top_logprobs)))
            else:
                reply = self.builder.dec(case.reply, add_special_tokens=False)["input_ids"]
                samples.append(self.builder.question(case.context, case.question, reply, profile))
        return StepData("qa", samples)

    def expand_step(self, rng: np.random.Generator, step: int) -> StepData:
        """EXPAND episodes over documents of 2 to 8 chunks: the first round's target expands the
        chunk(s) holding the answer, the second answers from the expanded text."""
        lengths = tuple(n for n in self.recipe.question_lengths if n > 256) or self.recipe.question_lengths
        count, lengths = self.per_step(rng, lengths)
        samples = []
        for j in range(max(1, count // 2)):
            case = self.question(rng, step * 16 + j, lengths)
            samples += self.builder.expand_rounds(case.context, case.question, case.answer_offsets, case.reply,
                                                  DEFAULT_CHUNK_TOKENS, self.profile(rng),
                                                  objective="expand")
        return StepData("expand", samples)

    def anchor_step(self, rng: np.random.Generator, step: int) -> StepData:
        """Text-only prompts, the target the base decoder's reply and distribution: questions over
        raw text of 256 or 512 tokens, and the reconstruction prompt's frame around a raw span."""
        samples = []
        length = int(rng.choice([256, 512]))
        for j in range(max(1, self.recipe.question_tokens // (2 * length))):
            if rng.random() < 0.5:
                case = self.question(rng, step * 16 + j, (length,))
                prompt = PROMPT_PROFILES[self.profile(rng)].question(case.context, case.question)
            else:
                span = self.exact(self.split("train"), rng, VALIDATION_SPAN)
                prompt = reconstruction_prompt(self.builder.dec.decode(span))
            taught = self.teacher_reply(self.builder.prompt_ids(prompt))
            samples.append(self.builder.chat("anchor", prompt, taught.ids, [], [], end=taught.stopped,
                                             soft=(taught.top_ids, taught.top_logprobs)))
        return StepData("anchor", samples)

    def validation_spans(self, length: int = VALIDATION_SPAN, count: int = VALIDATION_SPANS) -> list[list[int]]:
        """The fixed held-back spans every validation reads (the same in every call)."""
        rng = np.random.default_rng(stable_hash(f"campaign:validation:{length}"))
        return [self.exact(self.split("validation"), rng, length) for _ in range(count)]


QUESTION_OBJECTIVES = {"qa": CampaignData.qa_step, "expand": CampaignData.expand_step,
                       "anchor": CampaignData.anchor_step}
