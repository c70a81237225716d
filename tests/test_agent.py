"""EXPAND agent: reply parsing and the round loop with scripted replies (no model), and the
prompt layout of each profile as the tiny checkpoint's decoder reads it."""

import pytest
import torch

from model.agent import ExpandAgent, mentioned_chunks, parse_reply
from model.prompts import MEMORY_END, MEMORY_START, PROMPT_PROFILES, default_prompt_profile


# ---- parsing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,action,numbers,answer", [
    ("EXPAND: 2, 3", "expand", [2, 3], ""),
    ("EXPAND: 1\nANSWER: 42", "answer", [], "42"),  # both: the last one wins
    ("ANSWER: maybe 7.\nEXPAND: 4", "expand", [4], ""),
    ("Let me see. EXPAND:   2 ,\n 4,5", "expand", [2, 4, 5], ""),  # spaces and newlines inside the list
    ("expand: 3", "expand", [3], ""),
    ("EXPAND: 3, 3, 2, 3", "expand", [2, 3], ""),  # duplicates merged, sorted
    ("EXPAND: 0", "expand", [], ""),
    ("EXPAND: 007", "expand", [], ""),  # 7 > 5 chunks
    ("EXPAND: 02", "expand", [2], ""),
    ("EXPAND: chunk 2", "expand", [], ""),  # not a number list: names nothing
    ("I will EXPAND:", "answer", [], "I will EXPAND:"),  # nothing after the colon: not a directive
    ("REEXPAND:3", "expand", [3], ""),  # no word boundary needed, as in the authors' parser
    ("The code is 7ANSWER: 42", "answer", [], "42"),
    ("EXPAND: 2 ANSWER: ", "expand", [2], ""),  # nothing after ANSWER: not a directive
    ("The code is 5521.", "answer", [], "The code is 5521."),  # no directive: all of it is the answer
    ("", "answer", [], ""),
    ("answer:  Paris  ", "answer", [], "Paris"),
])
def test_parse_reply(text, action, numbers, answer):
    reply = parse_reply(text, num_chunks=5)
    assert (reply.action, reply.numbers, reply.answer) == (action, numbers, answer)


def test_parse_drops_and_reports_out_of_range_and_huge_numbers():
    reply = parse_reply("EXPAND: 0, 2, 6, " + "9" * 5000 + ", 6", num_chunks=5)
    assert reply.numbers == [2]
    assert reply.ignored == ["0: no such chunk (1-5)", "6: no such chunk (1-5)", f"{'9' * 5000}: no such chunk (1-5)"]


def test_demotion_expands_mentioned_chunks_at_most_five_or_chunk_one():
    assert mentioned_chunks("It is in chunk 3 or 12, maybe 2.", 20) == [2, 3, 12]
    assert mentioned_chunks("1 2 3 4 5 6 7", 10) == [1, 2, 3, 4, 5]
    assert mentioned_chunks("Chunk 99 or 1234 or 0", 10) == [1]
    assert mentioned_chunks("no numbers", 10) == [1]


# ---- the round loop -----------------------------------------------------------------------------
def scripted(replies):
    """A fake `generate` returning scripted replies; it records (prompt, prefix) per call."""
    calls = []

    def generate(prompt, regions, prefix):
        calls.append((prompt, prefix))
        yield "tick"
        return replies[len(calls) - 1], 10 * len(calls)

    return generate, calls


def run(generate, n=6, rounds=5, profile="paper"):
    latents = [torch.zeros(2, 4) for _ in range(n)]
    texts = [f"text of chunk {i + 1}" for i in range(n)]
    items = []
    runner = ExpandAgent(rounds, profile).run("Q?", latents, texts, generate)
    while True:
        try:
            items.append(next(runner))
        except StopIteration as stop:
            return stop.value, [i for i in items if not isinstance(i, str)], items.count("tick")


def test_expand_then_answer_shows_expanded_text_in_chunk_order():
    generate, calls = scripted(["EXPAND: 4, 2", "ANSWER: 42"])
    answer, rounds, ticks = run(generate)
    assert answer == "42" and ticks == 2  # generate's own events pass through
    assert [(r.action, r.expanded) for r in rounds] == [("expand", [2, 4]), ("answer", [])]
    second = calls[1][0]
    assert second.index("text of chunk 2") < second.index("text of chunk 4") < second.index("Question: Q?")
    assert "text of chunk 1" not in second and calls[0][1] == calls[1][1] == ""  # paper: nothing prefilled


def test_first_round_answer_is_demoted_to_the_chunks_it_mentions():
    generate, calls = scripted(["ANSWER: it is in chunk 3", "ANSWER: 7"])
    answer, rounds, _ = run(generate)
    assert answer == "7"
    assert (rounds[0].action, rounds[0].expanded) == ("demoted", [3])
    assert "text of chunk 3" in calls[1][0]


def test_expand_of_nothing_new_ends_the_loop_with_a_forced_round():
    generate, calls = scripted(["EXPAND: 1", "EXPAND: 1, 9", "ANSWER: done"])
    answer, rounds, _ = run(generate)
    assert answer == "done" and len(calls) == 3
    assert [r.action for r in rounds] == ["expand", "expand", "forced"]
    assert rounds[1].expanded == [] and rounds[1].ignored == ["9: no such chunk (1-6)", "1: already expanded"]
    assert "no expansion rounds left" in calls[2][0]


def test_rounds_run_out_then_one_forced_round():
    generate, calls = scripted(["EXPAND: 1", "EXPAND: 2", "EXPAND: 3", "the answer is 5"])
    answer, rounds, _ = run(generate, rounds=3)
    assert [r.action for r in rounds] == ["expand", "expand", "expand", "forced"]
    assert rounds[2].expanded == [] and rounds[2].ignored == ["3: no expansion rounds left"]
    assert answer == "the answer is 5"  # a forced reply without a directive is the answer
    assert [r.number for r in rounds] == [1, 2, 3, 4]
    assert "text of chunk 3" not in calls[3][0] and "text of chunk 2" in calls[3][0]


def test_studio_profile_prefills_the_first_and_the_forced_reply():
    generate, calls = scripted([" 2", "EXPAND: 5, 2", "EXPAND: 1", " 42"])
    answer, rounds, _ = run(generate, rounds=3, profile="studio")
    assert [c[1] for c in calls] == ["EXPAND:", "", "", "ANSWER:"]
    assert rounds[0].raw_output == "EXPAND: 2" and rounds[0].forced == "EXPAND:"
    assert answer == "42" and rounds[-1].action == "forced"


def test_default_profile_per_checkpoint():
    assert default_prompt_profile("embedded:smollm2-135m-cs16-mean:untrained") == "studio"
    assert default_prompt_profile("hub:latent-context/0.6b-4b-LCLM-16x") == "paper"
    assert default_prompt_profile("/models/lclm@abc") == "paper"


# ---- golden layout on the tiny checkpoint -----------------------------------------------------------
def test_paper_prompt_layout_as_the_decoder_reads_it(tiny_lclm_factory):
    lclm = tiny_lclm_factory()
    latents = [torch.randn(k, lclm.decoder_hidden_size) for k in (3, 1, 2)]
    texts = ["The vault code is 5521.", "The grass is green.", "The sky is blue."]
    prepared = []

    def generate(prompt, regions, prefix):
        prompt = lclm.chat(prompt, prefix)
        prepared.append((prompt, lclm.prepare(prompt, regions)))
        yield from ()
        return ["EXPAND: 3, 1", "ANSWER: 5521"][len(prepared) - 1], prepared[-1][1].positions

    runner = ExpandAgent(5, "paper").run("What is the vault code?", latents, texts, generate)
    rounds = [item for item in iter_all(runner)]
    first, second = prepared[0][0], prepared[1][0]
    tokenizer = lclm.decoder_tokenizer
    start_id = tokenizer.convert_tokens_to_ids(MEMORY_START)
    for prompt, tokens in prepared:
        ids = tokens.input_ids[0].tolist()
        assert ids.count(start_id) == 3 and ids.count(lclm.memory_token_id) == 6  # one region per chunk
        assert prompt.startswith("<|im_start|>user\n[Compressed document, one memory region per chunk]\nChunk 1: "
                                 + MEMORY_START)
        assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert [line.split(":")[0] for line in prompt.split("\n") if line.startswith("Chunk ")][:3] == \
            ["Chunk 1", "Chunk 2", "Chunk 3"]
    assert "You must EXPAND at least one chunk" in first and "[Expanded chunks" not in first
    assert "You have 4 expansion round(s) left after this one." in first
    assert "You have 3 expansion round(s) left after this one." in second
    expanded = second.split("[Expanded chunks, as plain text]\n")[1]
    assert expanded.startswith("The vault code is 5521.\n\nThe sky is blue.\n\nQuestion: What is the vault code?")
    assert "ANSWER: <your final answer>" in second and MEMORY_END + "\nChunk 2" in second
    assert [r.action for r in rounds] == ["expand", "answer"] and rounds[1].prompt_tokens == prepared[1][1].positions

    prompt = PROMPT_PROFILES["paper"].final_round(["R"], {1: "x"}, "Q?")
    assert "You have 0 expansion round(s) left" in prompt
    assert prompt.endswith("There are no expansion rounds left. Reply now with `ANSWER: <your final answer>`.")
    assert PROMPT_PROFILES["paper"].question(MEMORY_START + MEMORY_END, " Q? ") == MEMORY_START + MEMORY_END + "\n\nQ?"


def iter_all(runner):
    while True:
        try:
            item = next(runner)
        except StopIteration:
            return
        yield item


def test_sections_show_consecutive_chunks_under_one_label():
    from model.prompts import Section, chunk_lines, expand_prompt

    assert chunk_lines(["A", "B"]) == (["Chunk 1: A", "Chunk 2: B"], 2)
    lines, count = chunk_lines([Section(1, 3, "R1"), Section(4, 5, "R2"), Section(6, 6, "R3")])
    assert lines == ["Chunks 1-3: R1", "Chunks 4-5: R2", "Chunk 6: R3"] and count == 6
    prompt = expand_prompt([Section(1, 3, "R1"), Section(4, 5, "R2")], {4: "text of four"}, "Q?")
    assert prompt.startswith("The document is split into 5 chunks, each shown in compressed form (in 2 sections).")
    assert "### Chunk 4\ntext of four" in prompt
    paper = PROMPT_PROFILES["paper"].expand_round([Section(1, 2, "R")], {}, "Q?", 1)
    assert paper.startswith("[Compressed document: 2 chunks, one memory region per section of consecutive chunks]")


def test_a_layout_shows_sections_and_reads_no_more_chunks_than_fit():
    from model.agent import Layout

    generate, calls = scripted(["EXPAND: 5, 1, 3", "EXPAND: 6", "ANSWER: 42"])
    latents, texts = [torch.zeros(2, 4) for _ in range(6)], [f"text {i}" for i in range(1, 7)]
    runner = ExpandAgent(5, "paper").run("Q?", latents, texts, generate, Layout(per_section=3, max_expanded=2))
    rounds = [item for item in iter_all(runner) if not isinstance(item, str)]
    assert [(r.action, r.expanded) for r in rounds] == [("expand", [1, 3]), ("expand", []), ("forced", [])]
    assert rounds[0].ignored == ["5: no room left in the decoder's positions"]
    assert rounds[1].ignored == ["6: no room left in the decoder's positions"]
    assert "Chunks 1-3: " in calls[0][0] and "Chunks 4-6: " in calls[0][0] and "Chunk 1: " not in calls[0][0]
