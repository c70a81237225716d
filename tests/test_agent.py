"""EXPAND agent: chunking, reply parsing and the round loop (no model needed)."""

import pytest
import torch

from model.agent import ExpandAgent, chunk_size, make_chunks, parse_reply
from model.encoder import count_latents


@pytest.mark.parametrize("tokens,chunk,window,ratio", [
    (3000, 512, 1024, 16), (3000, 512, 1024, 4), (1000, 384, 1024, 8), (5000, 2048, 1024, 16),
    (17, 8, 16, 4), (1, 512, 1024, 16), (1030, 500, 1024, 16),
])
def test_chunks_cover_the_document_and_its_latents(tokens, chunk, window, ratio):
    chunks = make_chunks(tokens, chunk, window, ratio)
    assert chunks[0].start == 0 and chunks[-1].end == tokens
    assert all(a.end == b.start and a.latent_end == b.latent_start for a, b in zip(chunks, chunks[1:]))
    assert chunks[-1].latent_end == count_latents(tokens, window, ratio)
    size = chunk_size(chunk, window, ratio)
    for c in chunks:
        assert c.end - c.start <= size
        # a chunk shorter than a window never crosses a window boundary
        if size < window:
            assert c.start // window == (c.end - 1) // window


def test_chunk_size_aligns_to_ratio_and_window():
    assert chunk_size(512, 1024, 16) == 512
    assert chunk_size(500, 1024, 16) == 496
    assert chunk_size(3, 1024, 16) == 16
    assert chunk_size(1500, 1024, 16) == 1024
    assert chunk_size(2100, 1024, 16) == 2048


def test_parse_expand_with_bad_indices_reported():
    reply = parse_reply("EXPAND: 2, 9, x, 2, 1", num_chunks=5, expanded=[1])
    assert reply.action == "expand" and reply.indices == [2]
    assert reply.ignored == ["9: no such chunk (0-4)", "'x': not a chunk number", "2: repeated", "1: already expanded"]


def test_parse_answer_and_case_and_tool_syntax():
    assert parse_reply("answer: Paris.", 3).answer == "Paris."
    assert parse_reply("Let me look. EXPAND(0)", 3).indices == [0]
    assert parse_reply("EXPAND: chunks 1 and 2", 3).indices == [1, 2]


@pytest.mark.parametrize("text", ["", "I don't know", "EXPAND:", "EXPAND: 99"])
def test_parse_invalid_replies(text):
    assert parse_reply(text, 3).action == "invalid"


def scripted(replies):
    """A fake `generate` that returns scripted replies and records the prefixes it was forced to."""
    calls = []

    def generate(prompt, regions, prefix):
        calls.append((prompt, prefix))
        yield "tick"
        return replies[len(calls) - 1], 10 * len(calls)

    return generate, calls


def run(agent, generate, n=3):
    latents = [torch.zeros(2, 4) for _ in range(n)]
    texts = [f"text of chunk {i}" for i in range(n)]
    items = []
    runner = agent.run("Q?", latents, texts, generate)
    while True:
        try:
            items.append(next(runner))
        except StopIteration as stop:
            return stop.value, items


def test_agent_expands_then_answers_with_chunk_text_in_prompt():
    generate, calls = scripted([" 1", "ANSWER: 42"])
    answer, items = run(ExpandAgent(5), generate)
    rounds = [i for i in items if not isinstance(i, str)]
    assert answer == "42"
    assert calls[0][1] == "EXPAND:"  # the first round is forced to expand
    assert "text of chunk 1" in calls[1][0] and "text of chunk 0" not in calls[1][0]
    assert [r.action for r in rounds] == ["expand", "answer"] and rounds[0].expanded == [1]
    assert items.count("tick") == 2  # generate's own events pass through


def test_agent_forces_an_answer_after_max_rounds():
    generate, calls = scripted([" 0", "EXPAND: 1", " the end"])
    answer, items = run(ExpandAgent(3), generate)
    assert [c[1] for c in calls] == ["EXPAND:", "", "ANSWER:"]
    assert answer == "the end"


def test_agent_invalid_reply_leads_to_forced_answer():
    generate, calls = scripted([" 7", " oops"])
    answer, _ = run(ExpandAgent(5), generate)
    assert [c[1] for c in calls] == ["EXPAND:", "ANSWER:"]
    assert answer == "oops"
