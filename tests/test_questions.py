"""Question data made by code, the teacher's cached replies, and the question objectives
(qa, expand, anchor, reconstruction_long) learning on a tiny random pair."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.chunking import chunk_text
from model.training.campaign import (
    RECIPES,
    CampaignData,
    Phase,
    Recipe,
    improves,
    mixed_loss,
    set_decoder_lora,
    step_loss,
    trainable_groups,
)
from model.training.data.questions import KINDS, LENGTHS, Question, digits_in_place, draw, make_question, right
from model.training.data.shards import load_corpus
from model.training.data.synthetic import TASKS, Haystack, eval_seed, make_task
from model.training.examples import IGNORE, ExampleBuilder, Sample
from model.training.modeling import build_trainable
from model.training.teacher import TeacherCache, greedy_reply, soft_loss
from tests.test_training import builder, lclm, pair, tiny_corpus  # noqa: F401 (fixtures)

SENTENCES = [
    "The river turns the old mill wheel every morning before the market opens.",
    "Farmers bring grain from the hills and wait in line beside the stone wall.",
    "A clerk writes each delivery into a ledger that nobody else is allowed to read.",
    "In winter the water freezes near the banks, and the wheel stops for weeks.",
    "Children skate on the ice while their parents argue about the price of flour.",
    "The miller's daughter keeps the accounts and knows every family by name.",
    "Travellers say the bread from this valley is the best they have ever tasted.",
    "When the spring floods come, the whole village helps to clear the channel.",
    "An engineer from the city once proposed a steam engine, but the council refused.",
    "The mill has burned twice and been rebuilt each time with the same stones.",
    "Owls nest in the rafters and keep the storerooms free of mice all year.",
    "On festival days the wheel is decorated with ribbons and painted wooden birds.",
]
SUBJECTS = ("The miller", "A clerk", "The engineer", "Our neighbour", "The council", "A traveller", "The baker",
            "The ferryman", "A student", "The old priest", "The blacksmith", "A shepherd")
VERBS = ("repaired", "painted", "sold", "measured", "described", "carried", "inspected", "forgot", "praised", "hid")
OBJECTS = ("the wooden gate", "a basket of apples", "the heavy ledger", "the copper kettle", "a broken wheel",
           "the tall ladder", "a bundle of letters", "the blue boat", "a sack of flour", "the iron key")
WHEN = ("before dawn", "after the market", "during the flood", "on a quiet Sunday", "in the late autumn",
        "while it rained", "before the festival", "at noon")
_rng = np.random.default_rng(0)
VARIED = [f"{s} {v} {o} {w} near house {chr(65 + i % 26)}{i // 26}." for i, (s, v, o, w) in enumerate(
    zip(_rng.choice(SUBJECTS, 900), _rng.choice(VERBS, 900), _rng.choice(OBJECTS, 900), _rng.choice(WHEN, 900)))]
TEXT = " ".join(SENTENCES + VARIED)


def words(text: str) -> int:
    """A stand-in token count: words."""
    return len(text.split())


HAYSTACK = Haystack(TEXT, words)


# ---- the question generator ---------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(KINDS)), seed=st.integers(0, 2**32), tokens=st.sampled_from([128, *LENGTHS]))
def test_every_answer_occurs_once_in_a_document_within_the_length_asked(kind, seed, tokens):
    case = make_question(kind, seed, HAYSTACK, tokens, words)
    assert words(case.context) <= tokens
    assert words(case.context) >= tokens // 3  # about the length asked, not a stub
    for answer, offset in zip(case.answers, case.answer_offsets):
        assert case.context.count(answer) == 1
        assert case.context[offset:offset + len(answer)] == answer
    assert right(case, f"I think it is {case.reply}.") and not right(case, "no idea")
    assert case.question and case.question not in case.context


def test_cases_are_a_pure_function_of_the_seed():
    first = make_question("distractors", 7, HAYSTACK, 512, words)
    assert first == make_question("distractors", 7, HAYSTACK, 512, words)
    assert first != make_question("distractors", 8, HAYSTACK, 512, words)
    assert draw(0, 5) == draw(0, 5) and {draw(0, i)[0] for i in range(200)} == set(KINDS)
    assert {draw(0, i)[1] for i in range(200)} == set(LENGTHS)
    assert {draw(0, i, (512,))[1] for i in range(50)} == {512}


def test_the_passage_answer_labels_the_passage_that_mentions_the_object():
    case = make_question("passage", 3, HAYSTACK, 512, words)
    label = case.answers[0]
    passage = next(p for p in case.context.split("\n\n") if p.startswith(f"[{label}]"))
    thing = re.search(r"mentions (.+)\? Answer", case.question).group(1)
    assert thing in passage and sum(thing in p for p in case.context.split("\n\n")) == 1


def test_no_evaluation_case_appears_in_a_training_stream():
    """The evaluation suite's cases (its seeds, needles, keys and questions) never occur in
    training cases made from the very same haystack."""
    evaluation = [make_task(task, eval_seed(task, length, i), HAYSTACK, length)
                  for task in sorted(TASKS) for length in (512, 1024) for i in range(2)]
    training = [make_question(kind, seed, HAYSTACK, tokens, words)
                for kind, tokens, seed in (draw(0, i) for i in range(150))]
    training_text = "\n".join(c.context + "\n" + c.question for c in training)
    for example in evaluation:
        assert example.question not in training_text
        for answer in example.answers:
            if example.kind != "sentence_qa":  # its answers are haystack text, which both read
                assert answer not in training_text
    assert "special magic number" not in training_text.lower() and "VAR " not in training_text
    seeds = {seed for _, _, seed in (draw(0, i) for i in range(1000))}
    assert not seeds & {eval_seed(task, length, i) for task in TASKS for length in (512, 1024, 2048) for i in range(50)}


def test_digits_in_place_scores_swapped_digits_between_zero_and_one():
    assert digits_in_place("7679047", "It is 7679047.") == 1.0
    assert digits_in_place("7679047", "It is 7697047.") == pytest.approx(5 / 7)
    assert digits_in_place("7679047", "no number") == 0.0


# ---- the teacher --------------------------------------------------------------------------------
def nudge_lora(decoder) -> None:
    """Non-zero LoRA matrices: the LoRA decoder then differs from its base."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def test_the_teacher_is_the_base_decoder_and_its_replies_are_cached(pair, tmp_path):
    model = build_trainable(pair)
    nudge_lora(model.decoder)
    prompt = model.decoder_tokenizer(model.chat("Answer the question using the document. The mill turns."),
                                     add_special_tokens=False)["input_ids"]
    cache = TeacherCache(tmp_path / "teacher.jsonl")
    trains = {name: p.requires_grad for name, p in model.named_parameters()}
    taught = cache.reply(model.decoder, prompt, 6, stop_ids=set())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == trains
    assert len(taught.ids) == 6 and not taught.stopped and len(taught.top_ids) == 6
    with torch.no_grad():
        set_decoder_lora(model.decoder, False)
        base = model.decoder(input_ids=torch.tensor([prompt + taught.ids])).logits[0].float().log_softmax(-1)
        set_decoder_lora(model.decoder, True)
        lora = model.decoder(input_ids=torch.tensor([prompt + taught.ids])).logits[0].float().log_softmax(-1)
    rows = range(len(prompt) - 1, len(prompt) - 1 + len(taught.ids))
    expected = torch.stack([base[r].topk(len(taught.top_ids[0])).values for r in rows])  # [T, k]
    assert torch.allclose(torch.tensor(taught.top_logprobs), expected, atol=1e-3)
    assert taught.ids == [int(base[r].argmax()) for r in rows]
    assert not torch.allclose(lora[list(rows)], base[list(rows)], atol=1e-3)  # the LoRA is on again
    again = TeacherCache(tmp_path / "teacher.jsonl")
    assert again.reply(model.decoder, prompt, 6, stop_ids=set()) == taught and again.generated == 0


def test_a_stopped_reply_carries_the_stop_tokens_distribution(pair):
    model = build_trainable(pair)
    prompt = model.decoder_tokenizer("the mill", add_special_tokens=False)["input_ids"]
    first = greedy_reply(model.decoder, prompt, 4, stop_ids=set())
    stopped = greedy_reply(model.decoder, prompt, 4, stop_ids={first.ids[2]})
    assert stopped.stopped and stopped.ids == first.ids[:2] and len(stopped.top_ids) == 3


def test_soft_loss_is_smallest_where_the_student_matches_the_teacher():
    teacher = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1)  # [1, vocab]
    top = teacher.topk(3)
    near = soft_loss(teacher.clone(), top.indices, top.values)
    far = soft_loss(torch.tensor([[-1.0, 0.0, 1.0, 2.0]]), top.indices, top.values)
    assert float(near) < float(far)


def test_mixed_loss_distils_soft_samples_and_cross_entropies_the_others():
    logits = torch.randn(5, 11)
    hard = Sample("qa", [1, 2, 3, 4], [IGNORE, IGNORE, 3, 4])
    soft = Sample("qa", [1, 2, 3, 4], [IGNORE, 2, 3, 4], soft=([[3, 1]] * 3, [[-0.1, -2.5]] * 3))
    targets = torch.tensor([3, 4, 2, 3, 4])
    loss = mixed_loss(logits, targets, [hard, soft])
    expected = torch.cat([torch.nn.functional.cross_entropy(logits[:2], targets[:2], reduction="none"),
                          soft_loss(logits[2:], torch.tensor(soft.soft[0]), torch.tensor(soft.soft[1]))]).mean()
    assert torch.allclose(loss, expected)
    with pytest.raises(ValueError):
        mixed_loss(logits[:4], targets[:4], [hard, soft])
    with pytest.raises(ValueError):
        Sample("qa", [1, 2], [IGNORE, 2], soft=([[1]] * 2, [[0.0]] * 2))


# ---- the question objectives on the tiny pair ---------------------------------------------------
RATES = {"adapter": 3e-3, "encoder": 3e-3, "decoder": 3e-3, "tags": 3e-3}
QUESTIONS = {name: Recipe(name, "", phases=(Phase(16),), objectives={name: 1.0}, batch_tokens=64, warmup_steps=1,
                          train_decoder=True, lr=RATES, question_tokens=256, question_lengths=(128,),
                          teacher_tokens=6, long_span=32)
             for name in ("qa", "expand", "anchor", "reconstruction_long", "reconstruction_facts")}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(QUESTIONS))
def test_each_question_objective_lowers_its_loss_on_a_fixed_batch(name, pair):
    recipe = QUESTIONS[name]
    lclm = build_trainable(replace(pair, lora=replace(pair.lora, r=4)))
    groups = trainable_groups(lclm, recipe)
    optimizer = torch.optim.AdamW([p for ps in groups.values() for _, p in ps], lr=3e-3)
    data = CampaignData(ExampleBuilder(lclm), load_corpus(pair.corpus), recipe, seed=0)
    batch = data.step(0, 0)
    assert batch.objective == name and batch.samples
    if name == "anchor":  # text only, the base decoder's distribution as the target
        assert all(not s.documents and s.soft is not None for s in batch.samples)
    elif not name.startswith("reconstruction"):
        assert all(s.documents for s in batch.samples)
    pad = lclm.decoder_tokenizer.pad_token_id or 0
    losses = []
    for _ in range(6):
        loss, correct, count = step_loss(lclm, batch, pad)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses


def test_a_fact_span_holds_its_questions_answer_whole(pair):
    """reconstruction_facts reads back spans of question documents with the answer value inside."""
    lclm = build_trainable(pair)
    recipe = replace(QUESTIONS["reconstruction_facts"], question_kinds={"fact": 0.5, "table": 0.5})
    data = CampaignData(ExampleBuilder(lclm), load_corpus(pair.corpus), recipe, seed=0)
    for index in range(6):
        span = data.fact_span(np.random.default_rng(index), index, 16)
        case = data.question(np.random.default_rng(index), index)
        assert len(span) == 16
        assert case.answers[0] in lclm.decoder_tokenizer.decode(span)


def test_a_qa_sample_distils_the_teachers_reply_where_it_is_right(pair, monkeypatch):
    """The target is the teacher's own reply (with its distribution) when it holds the answer,
    the reference reply otherwise."""
    from model.training import campaign
    from model.training.teacher import TeacherReply

    lclm = build_trainable(pair)
    data = CampaignData(ExampleBuilder(lclm), load_corpus(pair.corpus), QUESTIONS["qa"], seed=0)
    case = Question("fact", "The code of the mill is 48213. " + TEXT[:300], "What is the code of the mill?", ["48213"],
                    [24])
    monkeypatch.setattr(campaign.CampaignData, "question", lambda self, rng, index, lengths=None: case)
    spoken = lclm.decoder_tokenizer("It is 48213", add_special_tokens=False)["input_ids"]
    for words_said, expect_soft in ((spoken, True), (spoken[:1], False)):
        reply = TeacherReply(words_said, [[1, 2]] * (len(words_said) + 1), [[-0.1, -3.0]] * (len(words_said) + 1),
                             True)
        monkeypatch.setattr(campaign.CampaignData, "teacher_reply", lambda self, ids, r=reply: r)
        sample = data.step(0, 0, objective="qa").samples[0]
        target = [t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE]
        if expect_soft:
            assert sample.soft == (reply.top_ids, reply.top_logprobs) and target[:-1] == spoken
        else:
            assert sample.soft is None
            assert lclm.decoder_tokenizer.decode(target[:-1]) == "48213"


def test_a_reference_recipe_trains_on_the_bare_answer_without_asking_the_teacher(pair, monkeypatch):
    """qa_target "reference": every question's target is the bare reference answer (cross-entropy),
    and the teacher is never asked; question_kinds limits the kinds drawn."""
    from model.training import campaign

    lclm = build_trainable(pair)
    recipe = replace(RECIPES["answer-facts"], question_lengths=(256,))
    data = CampaignData(ExampleBuilder(lclm), load_corpus(pair.corpus), recipe, seed=0)
    monkeypatch.setattr(campaign.CampaignData, "teacher_reply", lambda self, ids: pytest.fail("no teacher"))
    asked = []
    real_question = campaign.CampaignData.question

    def recording(self, rng, index, lengths=None):
        case = real_question(self, rng, index, lengths)
        asked.append(case)
        return case
    monkeypatch.setattr(campaign.CampaignData, "question", recording)
    samples = data.step(0, 0, objective="qa").samples
    assert samples and len(samples) == len(asked)
    for sample, case in zip(samples, asked):
        target = [t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE]
        assert sample.soft is None and lclm.decoder_tokenizer.decode(target[:-1]) == case.reply
    kinds = {draw(0, i, (256,), recipe.question_kinds)[0] for i in range(200)}
    assert kinds == set(recipe.question_kinds) and "quote" not in kinds


@pytest.mark.parametrize("profile", ["studio", "paper"])
def test_an_expand_episode_expands_the_chunk_holding_the_answer_numbered_from_1(profile, lclm, builder):
    context = " ".join(SENTENCES * 3) + " The locker code of the Moreau archive is 55210. " + " ".join(SENTENCES)
    offset = context.index("55210")
    rounds = builder.expand_rounds(context, "What is the locker code?", [offset], "55210", 24, profile, "expand")
    chunks = chunk_text(context, lclm.decoder_tokenizer, 24)
    holding = next(c.number for c in chunks if c.start_char <= offset < c.end_char)
    assert holding > 1 and len(rounds) == 2 and {s.objective for s in rounds} == {"expand"}
    first = lclm.decoder_tokenizer.decode([t for t, label in zip(rounds[0].input_ids, rounds[0].labels)
                                           if label != IGNORE])
    assert first.startswith(f"EXPAND: {holding}")
    shown = lclm.decoder_tokenizer.decode(rounds[1].input_ids)
    assert chunks[holding - 1].text.strip() in shown and ("### Chunk" in shown) == (profile == "studio")


# ---- publishing a question recipe ---------------------------------------------------------------
def test_a_question_recipe_publishes_only_more_answers_with_reconstruction_kept():
    start = {"teacher_forced": 0.92, "free_running": 0.90, "questions": 0.0}
    assert improves({"teacher_forced": 0.9, "free_running": 0.86, "questions": 0.4}, start, None)
    assert not improves({"teacher_forced": 0.9, "free_running": 0.84, "questions": 0.4}, start, None)  # lost 0.06
    assert not improves({"teacher_forced": 0.9, "free_running": 0.9, "questions": 0.0}, start, None)
    shipped = {"teacher_forced": 0.9, "free_running": 0.95, "questions": 0.5}  # a card's figures
    assert not improves({"teacher_forced": 0.9, "free_running": 0.88, "questions": 0.45}, start, shipped)
    assert improves({"teacher_forced": 0.9, "free_running": 0.88, "questions": 0.55}, start, shipped)
    # a reconstruction recipe keeps its rule
    assert improves({"teacher_forced": 0.95, "free_running": 0.91}, {"teacher_forced": 0.9, "free_running": 0.9}, None)


def test_the_question_recipes_leave_the_latents_as_they_are(pair):
    """answer and answer-expand train the decoder LoRA and the memory rows only: the encoder and
    adapter, whose latents already carry the text, stay frozen."""
    from model.training.campaign import RECIPES

    lclm = build_trainable(pair)
    for name in ("answer-frozen", "answer-expand-frozen"):
        groups = trainable_groups(lclm, RECIPES[name])
        assert set(groups) == {"decoder", "tags"}
        assert not any(p.requires_grad for n, p in lclm.named_parameters() if n.startswith(("encoder.", "adapter.")))
