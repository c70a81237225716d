"""Validation: teacher-forced and free-running reconstruction of the held-back spans (`validate`),
and for question recipes answers, EXPAND's first chunk and the text anchor (`validate_questions`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from model.chunking import DEFAULT_CHUNK_TOKENS, chunk_text
from model.fidelity import reconstruct, token_accuracy
from model.generation import decode, prefill
from model.prompts import PROMPT_PROFILES, memory_region
from model.training.campaign.data import CampaignData
from model.training.campaign.objectives import label_logits
from model.training.data.corpus import stable_hash
from model.training.data.questions import Question, make_question, right
from model.training.examples import ExampleBuilder, Sample, collate


def other_span(samples: list[Sample]) -> list[int]:
    """For each reconstruction sample the next one (cyclically) whose document has as many
    latents (encoder tokenizations of equal spans may differ in length), else itself: whose
    latents it reads in the validation with other spans' latents."""
    counts = [s.regions[0][2] - s.regions[0][1] for s in samples]
    chosen = []
    for i, count in enumerate(counts):
        ring = [(i + k) % len(samples) for k in range(1, len(samples))]
        chosen.append(next((j for j in ring if counts[j] == count), i))
    return chosen


@torch.no_grad()
def validate(lclm, builder: ExampleBuilder, spans: list[list[int]], pad_id: int, free_running: int,
             autocast: bool) -> dict:
    """Teacher-forced accuracy on the span tokens (end of turn excluded), the same with every
    span given another span's latents (the gap between the two is what the latents carry; a
    trained decoder also learns the corpus, which lifts both), and free-running
    reconstruction token accuracy of the first `free_running` spans."""
    was_training = lclm.training
    lclm.eval()
    samples = [builder.reconstruction(s) for s in spans]
    others = [replace(s, documents=samples[j].documents) for s, j in zip(samples, other_span(samples))]
    correct, total = {"own": 0, "other": 0}, 0
    with torch.autocast(lclm.device.type, dtype=torch.bfloat16, enabled=autocast):
        for first in range(0, len(spans), 8):
            for which, group in (("own", samples), ("other", others)):
                logits, targets = label_logits(lclm, collate(group[first:first + 8], pad_id))
                hits = (logits.argmax(-1) == targets).view(-1, len(spans[0]) + 1)[:, :-1]  # [b, span], no end of turn
                correct[which] += int(hits.sum())
            total += hits.numel()
        scores = [token_accuracy(ids, reconstruct(lclm, lclm.encode(builder.to_encoder(ids)), len(ids) + 8))
                  for ids in spans[:free_running]]
    lclm.train(was_training)
    return {"teacher_forced": round(correct["own"] / max(total, 1), 4),
            "teacher_forced_other": round(correct["other"] / max(total, 1), 4),
            "free_running": round(float(np.mean(scores)), 4) if scores else None}


QUESTION_CASES = 12  # LCLM answers validated per call (fact, distractors and table cases of 512 tokens)
EXPAND_CASES = 6  # first EXPAND rounds validated (fact cases of 1,024 tokens: 4 chunks)
ANCHOR_CASES = 8  # text-only questions answered by the trained and the base decoder


def validation_questions(data: CampaignData) -> dict[str, list[Question]]:
    """The fixed held-back question cases (validation split, a seed space of their own)."""
    rng = np.random.default_rng(stable_hash("campaign:validation:questions"))
    kinds = ("fact", "distractors", "table")

    def case(kind: str, tokens: int, i: int) -> Question:
        return make_question(kind, stable_hash(f"campaign:validation:{kind}:{tokens}:{i}"),
                             data.haystack(rng, tokens, "validation"), tokens, data.count)

    return {"lclm": [case(kinds[i % 3], 512, i) for i in range(QUESTION_CASES)],
            "expand": [case("fact", 1024, i) for i in range(EXPAND_CASES)],
            "anchor": [case(kinds[i % 3], 256, 100 + i) for i in range(ANCHOR_CASES)]}


@torch.no_grad()
def validate_questions(lclm, data: CampaignData, cases: dict[str, list[Question]], autocast: bool,
                       max_new_tokens: int = 48) -> dict:
    """Greedy answers in the studio profile: the LCLM's from compressed documents (exact match by
    the RULER rule, and digits in place for numeric answers), the chunk the first EXPAND round
    names against the chunk holding the answer, and how often the trained decoder's reply to a
    text-only question equals the base decoder's."""
    from model.agent import parse_reply
    from model.training.data.questions import digits_in_place

    was_training = lclm.training
    lclm.eval()
    builder, stops, profile = data.builder, data.stops, PROMPT_PROFILES["studio"]

    def generate(prompt: str, regions: list[torch.Tensor], prefix: str = "", tokens: int = max_new_tokens) -> str:
        state = prefill(lclm.decoder, lclm.prepare(lclm.chat(prompt, prefix), regions).inputs_embeds)
        return builder.dec.decode(list(decode(lclm.decoder, state, tokens, stops)))

    exact, digits, replies = [], [], []
    with torch.autocast(lclm.device.type, dtype=torch.bfloat16, enabled=autocast):
        for case in cases["lclm"]:
            latents = lclm.encode(builder.encode_text(case.context))  # [M, D]
            reply = generate(profile.question(memory_region(int(latents.shape[0])), case.question), [latents])
            exact.append(right(case, reply))
            if case.answers[0].isdigit():
                digits.append(digits_in_place(case.answers[0], reply))
            replies.append(reply[:120])
        chosen = []
        for case in cases["expand"]:
            chunks = chunk_text(case.context, builder.dec, DEFAULT_CHUNK_TOKENS)
            holding = next(c.number for c in chunks if c.start_char <= case.answer_offsets[0] < c.end_char)
            latents = [lclm.encode(builder.encode_text(c.text)) for c in chunks]  # [M_i, D] each
            prompt = profile.expand_round([memory_region(int(x.shape[0])) for x in latents], {}, case.question, 4)
            reply = parse_reply(profile.first_reply_prefix + generate(prompt, latents, profile.first_reply_prefix, 8),
                                len(chunks))
            chosen.append(reply.action == "expand" and reply.numbers[:1] == [holding])
        same = []
        for case in cases["anchor"]:
            prompt_ids = builder.prompt_ids(profile.question(case.context, case.question))
            base = data.teacher.reply(lclm.decoder, prompt_ids, max_new_tokens, stops, autocast).ids
            state = prefill(lclm.decoder, lclm.decoder.get_input_embeddings()(torch.tensor([prompt_ids],
                                                                                             device=lclm.device)))
            same.append(list(decode(lclm.decoder, state, max_new_tokens, stops)) == base)
    lclm.train(was_training)
    return {"questions": round(float(np.mean(exact)), 4), "digits": round(float(np.mean(digits)), 4) if digits else 0.0,
            "expand_first": round(float(np.mean(chosen)), 4), "anchor_same": round(float(np.mean(same)), 4),
            "replies": replies[:3]}
