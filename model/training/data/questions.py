"""Question-answering data for teaching an LCLM to answer from its latents, made by code, offline.

Each kind is a small class registered in KINDS. A case hides facts of its own wording in haystack
sentences (training-split text) and asks about one of them:
- fact: one fact ("Note: the locker code of the Moreau archive is 48213.");
- distractors: the asked fact among facts of other holders and of the same holder's other attributes;
- table: a register of holder -> value lines placed inside the text; the value of one holder is asked;
- chain: "Let lark_7 be 5120." then names that take an earlier name's value; the last name's value is asked;
- passage: the text cut into labelled passages, one of which mentions a unique object; which passage?
- quote: quote the sentence of the document that begins with the given words.

Templates, holder and attribute vocabularies and value formats differ from the RULER-style
evaluation suite's (model/training/data/synthetic.py, bench/quality), and seeds come from
`train_seed`, so no evaluation case can appear in a training stream (tests/test_questions.py).
Every answer occurs in its document; a document holds at most the tokens asked for.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from model.training.data.synthetic import CountFn, Haystack, insert_at, train_seed

LENGTHS = (256, 512, 1024, 2048)  # context tokens a case is made at (1 to 8 chunks of 256)
LENGTH_WEIGHTS = (0.3, 0.35, 0.25, 0.1)

HOLDERS = ("Alvarez", "Brennan", "Castellan", "Dumont", "Eriksen", "Fairweather", "Galloway", "Hartmann",
           "Iverson", "Jablonski", "Kowalczyk", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrakis",
           "Quintero", "Rasmussen", "Sorensen", "Tanaka", "Ulrich", "Valdez", "Whitfield", "Yamada", "Zielinski")
PLACES = ("archive", "workshop", "clinic", "depot", "observatory", "bakery", "foundry", "greenhouse", "library",
          "harbour office", "laboratory", "studio")
ATTRIBUTES = ("locker code", "reference number", "serial number", "access PIN", "room number", "tracking number",
              "account number", "permit number")
WORD_VALUES = ("Lisbon", "Nairobi", "Osaka", "Quebec", "Tbilisi", "Valparaiso", "Winnipeg", "Bergen", "Cusco",
               "Dakar", "Hobart", "Krakow", "Lagos", "Mendoza", "Oaxaca", "Perth")
NAMES = ("lark", "wren", "heron", "finch", "plover", "egret", "swift", "crane", "ibis", "kite", "robin", "tern")
OBJECTS = ("a brass telescope", "a green umbrella", "a folding ladder", "a cracked teapot", "a silver whistle",
           "a wooden chess set", "a paper lantern", "a rusty anchor", "a velvet hat", "a glass marble")

FACTS = ("Note: the {attribute} of the {holder} is {value}.",
         "For the record, the {holder} has the {attribute} {value}.",
         "The {holder} was given the {attribute} {value}.")
ASKS = ("What is the {attribute} of the {holder}?",
        "Which {attribute} does the {holder} have?",
        "According to the document, what {attribute} was given to the {holder}?")


@dataclass
class Question:
    kind: str
    context: str
    question: str
    answers: list[str]  # every one occurs in the context; a right reply holds them all
    answer_offsets: list[int] = field(default_factory=list)  # character offset of each answer in `context`

    @property
    def reply(self) -> str:
        """The reference reply (the training target where the teacher's own answer is wrong)."""
        return ", ".join(self.answers)


def right(question: Question, reply: str) -> bool:
    """Whether `reply` holds every answer (case-insensitive substring, the RULER rule)."""
    return all(a.lower() in reply.lower() for a in question.answers)


def holder(rng: random.Random) -> str:
    return f"{rng.choice(HOLDERS)} {rng.choice(PLACES)}"


def value(rng: random.Random) -> str:
    """Digits of 4 to 8 places (most), a letter code or a city."""
    draw = rng.random()
    if draw < 0.75:
        places = rng.randint(4, 8)
        return str(rng.randrange(10 ** (places - 1), 10 ** places))
    if draw < 0.9:
        return f"{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}-{rng.randrange(1000, 10000)}"
    return rng.choice(WORD_VALUES)


def fact(rng: random.Random, who: str, attribute: str, what: str) -> str:
    return rng.choice(FACTS).format(holder=who, attribute=attribute, value=what)


def ask(rng: random.Random, who: str, attribute: str) -> str:
    return rng.choice(ASKS).format(holder=who, attribute=attribute)


class Kind:
    name = ""

    def make(self, rng: random.Random, haystack: Haystack, tokens: int, count: CountFn) -> Question:
        raise NotImplementedError


def filler(rng: random.Random, haystack: Haystack, tokens: int, inserted: list[str], count: CountFn) -> list[str]:
    """Haystack sentences that leave room for the inserted texts within `tokens`."""
    room = tokens - sum(count(t) + 1 for t in inserted)
    if room < 32:
        raise ValueError(f"{tokens} tokens leave no room for the inserted facts")
    return haystack.take(rng, room)


def located(context: str, needles: list[str], answers: list[str], offsets: list[int]) -> list[int]:
    """The character offset of each answer inside its needle, placed at `offsets`."""
    return [at + context[at:at + len(n)].index(a) for n, a, at in zip(needles, answers, offsets)]


class Fact(Kind):
    name = "fact"

    def make(self, rng, haystack, tokens, count):
        who, attribute, what = holder(rng), rng.choice(ATTRIBUTES), value(rng)
        needle = fact(rng, who, attribute, what)
        context, offsets = insert_at(filler(rng, haystack, tokens, [needle], count), [(rng.random(), needle)])
        return Question(self.name, context, ask(rng, who, attribute), [what], located(context, [needle], [what], offsets))


class Distractors(Kind):
    name = "distractors"

    def make(self, rng, haystack, tokens, count):
        attribute = rng.choice(ATTRIBUTES)
        holders = list(dict.fromkeys(holder(rng) for _ in range(8)))[: rng.randint(3, 5)]
        values = list(dict.fromkeys(value(rng) for _ in range(12)))
        other_attribute = rng.choice([a for a in ATTRIBUTES if a != attribute])
        needles = [fact(rng, h, attribute, v) for h, v in zip(holders, values)]
        needles.append(fact(rng, holders[0], other_attribute, values[len(holders)]))
        placed = [(rng.random(), n) for n in needles]
        context, offsets = insert_at(filler(rng, haystack, tokens, needles, count), placed)
        return Question(self.name, context, ask(rng, holders[0], attribute), [values[0]],
                        located(context, needles[:1], values[:1], offsets[:1]))


class Table(Kind):
    name = "table"

    def make(self, rng, haystack, tokens, count):
        attribute = rng.choice(ATTRIBUTES)
        holders = list(dict.fromkeys(holder(rng) for _ in range(16)))[: rng.randint(4, 8)]
        values = list(dict.fromkeys(value(rng) for _ in range(24)))[: len(holders)]
        holders = holders[: len(values)]
        lines = [f"Register of {attribute}s:"] + [f"- {h}: {v}" for h, v in zip(holders, values)]
        block = "\n".join(lines)
        asked = rng.randrange(len(holders))
        context, offsets = insert_at(filler(rng, haystack, tokens, [block], count), [(rng.random(), block)])
        line = f"- {holders[asked]}: {values[asked]}"
        at = offsets[0] + block.index(line) + len(line) - len(values[asked])
        question = f"In the register of {attribute}s, which value is listed for the {holders[asked]}?"
        return Question(self.name, context, question, [values[asked]], [at])


class Chain(Kind):
    name = "chain"

    def make(self, rng, haystack, tokens, count):
        names = list(dict.fromkeys(f"{rng.choice(NAMES)}_{rng.randrange(1, 100)}" for _ in range(12)))
        names = names[: rng.randint(2, 4)]
        what = str(rng.randrange(1000, 100000))
        statements = [f"Let {names[0]} be {what}."] + [f"{b} takes the value of {a}." for a, b in zip(names, names[1:])]
        depths = sorted(rng.random() for _ in statements)
        context, offsets = insert_at(filler(rng, haystack, tokens, statements, count), list(zip(depths, statements)))
        question = f"Following the assignments in the document, what value does {names[-1]} hold?"
        return Question(self.name, context, question, [what], located(context, statements[:1], [what], offsets[:1]))


class Passage(Kind):
    name = "passage"

    def make(self, rng, haystack, tokens, count):
        parts = rng.randint(3, 6)
        thing, place = rng.choice(OBJECTS), rng.choice(PLACES)
        needle = f"Someone left {thing} in the {place}."
        sentences = filler(rng, haystack, tokens - 8 * parts, [needle], count)
        size = max(1, len(sentences) // parts)
        groups = [sentences[i * size:(i + 1) * size] for i in range(parts - 1)] + [sentences[(parts - 1) * size:]]
        groups = [g for g in groups if g]
        chosen = rng.randrange(len(groups))
        groups[chosen].insert(rng.randint(0, len(groups[chosen])), needle)
        blocks = [f"[Passage {i}] " + " ".join(g) for i, g in enumerate(groups, start=1)]
        context = "\n\n".join(blocks)
        label = f"Passage {chosen + 1}"
        question = f"Which passage mentions {thing}? Answer with its label, such as Passage 1."
        return Question(self.name, context, question, [label], [context.index(f"[{label}]") + 1])


class Quote(Kind):
    name = "quote"

    def make(self, rng, haystack, tokens, count):
        sentences = filler(rng, haystack, tokens, [], count)
        context = " ".join(sentences)
        for index in rng.sample(range(len(sentences)), len(sentences)):
            words = sentences[index].split()
            if len(words) < 7 or len(sentences[index]) > 200:
                continue
            head = " ".join(words[:4])
            if context.count(head) == 1 and context.count(sentences[index]) == 1:
                question = f'Quote the sentence of the document that begins with "{head}".'
                return Question(self.name, context, question, [sentences[index]], [context.index(sentences[index])])
        raise ValueError("no sentence of the context begins uniquely")


KINDS: dict[str, type[Kind]] = {cls.name: cls for cls in (Fact, Distractors, Table, Chain, Passage, Quote)}
KIND_WEIGHTS = {"fact": 0.3, "distractors": 0.2, "table": 0.15, "chain": 0.1, "passage": 0.1, "quote": 0.15}


def make_question(kind: str, seed: int, haystack: Haystack, tokens: int, count: CountFn,
                  attempts: int = 20) -> Question:
    """One case of `kind` of at most `tokens` context tokens (by `count`). Retries when an answer
    would occur more than once, or the context came out longer than asked."""
    rng = random.Random(seed)
    for _ in range(attempts):
        try:
            case = KINDS[kind]().make(rng, haystack, tokens, count)
        except ValueError:
            continue
        if all(case.context.count(a) == 1 for a in case.answers) and count(case.context) <= tokens:
            return case
    raise ValueError(f"could not make a {kind} case of {tokens} tokens after {attempts} attempts")


def draw(run_seed: int, index: int, lengths: tuple[int, ...] = LENGTHS,
         kinds: dict[str, float] | None = None) -> tuple[str, int, int]:
    """(kind, context tokens, seed) of training case `index`: a pure function of the run's seed;
    kinds drawn by `kinds` (kind -> weight, default KIND_WEIGHTS)."""
    kinds = kinds or KIND_WEIGHTS
    seed = train_seed(run_seed, "questions", index)
    rng = random.Random(seed)
    kind = rng.choices(list(kinds), weights=list(kinds.values()))[0]
    weights = [w for n, w in zip(LENGTHS, LENGTH_WEIGHTS) if n in lengths] or [1.0] * len(lengths)
    tokens = rng.choices([n for n in LENGTHS if n in lengths] or list(lengths), weights=weights)[0]
    return kind, tokens, seed


def digits_in_place(reference: str, reply: str) -> float:
    """Share of the reference's digits that the first number of as many digits in `reply` has in
    their place (0 when the reply has none): a finer score than exact match for numbers."""
    found = re.search(r"\d{%d}" % len(reference), reply) if reference.isdigit() else None
    if not found:
        return 0.0
    return sum(a == b for a, b in zip(reference, found.group(0))) / len(reference)
