"""Property-based tests on what users and models may send: ingest of arbitrary bytes, text and
file names, and the EXPAND reply parser on arbitrary model output."""

import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.ingest import SUPPORTED_SUFFIXES, clean_text, read_bytes
from model.agent import ACTION, parse_reply
from model.errors import UserError

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

suffixes = st.sampled_from(sorted(SUPPORTED_SUFFIXES) + [".exe", ".PDF", ".Html", ".docx", "."])
names = st.builds(lambda stem, suffix: stem + suffix, st.text(max_size=20), suffixes)
# bytes that look like documents often enough to reach the parsers: markup, PDF headers, BOMs
prefixes = st.sampled_from([b"", b"%PDF-1.4\n", b"<html><![", b"<!--", b"\xef\xbb\xbf", b"\xff\xfe", b"\x00"])
documents = st.builds(lambda prefix, body: prefix + body, prefixes, st.binary(max_size=2000))


def assert_clean(text: str) -> None:
    assert text.strip() and "\x00" not in text and "\r" not in text
    assert text == text.strip("\n") and all(line == line.rstrip() for line in text.split("\n"))


@PROPERTY
@given(documents, names)
@example(b"<p>x</p><![foo[", "a.html")
@example(b"%PDF-1.4\n%%EOF", "a.pdf")
def test_read_bytes_gives_clean_text_or_a_user_error(data, name):
    try:
        text = read_bytes(data, name)
    except UserError as err:
        assert str(err)
    else:
        assert_clean(text)


@PROPERTY
@given(st.text(max_size=2000))
def test_clean_text_gives_clean_text_or_a_user_error(text):
    try:
        cleaned = clean_text(text)
    except UserError as err:
        assert str(err) == "the document is empty or only whitespace"
        assert not text.replace("\x00", "").strip()
    else:
        assert_clean(cleaned)
        assert cleaned == clean_text(cleaned)  # cleaning twice changes nothing


chunk_words = st.one_of(st.integers(-3, 40).map(str), st.sampled_from(["and", "chunk", "x", "1.5", "99999999999"]),
                        st.text(max_size=6))
replies = st.one_of(
    st.text(max_size=300),
    st.builds(lambda keyword, sep, words, tail: keyword + sep + sep.join(words) + tail,
              st.sampled_from(["EXPAND:", "expand(", "ANSWER:", "Expand", "EXPAND: chunks"]),
              st.sampled_from([" ", ", ", ";", "\n"]), st.lists(chunk_words, max_size=8), st.text(max_size=30)),
)


def named_items(text: str) -> list[str]:
    """What an EXPAND reply names: the words on the line after the first EXPAND keyword."""
    match = ACTION.search(text)
    if not match or match.group(1).upper() != "EXPAND":
        return []
    line = text[match.end():].split("\n", 1)[0]
    return [word.strip(".") for word in re.findall(r"[^\s,;()\[\]]+", line)]


@PROPERTY
@given(replies, st.integers(0, 30), st.data())
@example("EXPAND: " + "9" * 5000, 3, None)
@example("EXPAND: 2, 2, 0, 7", 3, None)
def test_parse_reply_never_raises_and_honours_only_valid_new_chunks(text, num_chunks, data):
    expanded = []
    if data is not None and num_chunks:
        expanded = data.draw(st.lists(st.integers(0, num_chunks - 1), max_size=5, unique=True))
    reply = parse_reply(text, num_chunks, expanded)
    assert reply.action in ("expand", "answer", "invalid")
    assert all(0 <= i < num_chunks for i in reply.indices)
    assert len(set(reply.indices)) == len(reply.indices)
    assert not set(reply.indices) & set(expanded)
    if reply.action == "answer":
        assert not reply.indices and not reply.ignored
        return
    assert reply.indices if reply.action == "expand" else reply.ignored  # honoured, or the reason is reported
    numbers = [item for item in named_items(text) if re.fullmatch(r"[0-9]+", item)]
    for item in numbers:
        if len(item) > 9 or int(item) >= num_chunks:
            assert any(i.startswith(f"{item}: no such chunk") for i in reply.ignored), (item, reply)
        elif int(item) in expanded:
            assert f"{item}: already expanded" in reply.ignored
        else:
            assert int(item) in reply.indices
    assert sorted(reply.indices) == sorted({int(i) for i in numbers if len(i) <= 9 and int(i) < num_chunks}
                                           - set(expanded))
