"""Property-based tests on what users and models may send: ingest of arbitrary bytes, text and
file names, and the EXPAND reply parser on arbitrary model output."""

import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.ingest import SUPPORTED_SUFFIXES, clean_text, read_bytes
from model.agent import parse_reply
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
              st.sampled_from(["EXPAND:", "expand(", "ANSWER:", "Expand", "EXPAND: chunks", "ANSWER: 3\nEXPAND :"]),
              st.sampled_from([" ", ", ", ";", "\n"]), st.lists(chunk_words, max_size=8), st.text(max_size=30)),
)


def named_numbers(text: str) -> list[str]:
    """The digit runs an EXPAND reply names: those right after the last directive, if it is EXPAND."""
    text = text.strip()
    directives = [d for d in re.finditer(r"(EXPAND|ANSWER)\s*:", text, re.IGNORECASE)
                  if (text[d.end():].strip() if d.group(1).upper() == "ANSWER"
                      else re.match(r"[0-9,\s]", text[d.end():]))]
    if not directives or directives[-1].group(1).upper() != "EXPAND":
        return []
    listed = re.match(r"[0-9,\s]*", text[directives[-1].end():]).group(0)
    return re.findall(r"[0-9]+", listed)


@PROPERTY
@given(replies, st.integers(0, 30))
@example("EXPAND: " + "9" * 5000, 3)
@example("EXPAND: 2, 2, 0, 7", 3)
@example("ANSWER: 4\nEXPAND:\n 1,\n2", 3)
def test_parse_reply_never_raises_and_honours_only_chunks_in_range(text, num_chunks):
    reply = parse_reply(text, num_chunks)
    assert reply.action in ("expand", "answer")
    assert reply.numbers == sorted(set(reply.numbers))
    assert all(1 <= n <= num_chunks for n in reply.numbers)
    if reply.action == "answer":
        assert not reply.numbers and not reply.ignored
        return
    numbers = named_numbers(text)
    for item in numbers:
        if len(item) > 9 or not 1 <= int(item) <= num_chunks:
            assert f"{item}: no such chunk (1-{num_chunks})" in reply.ignored, (item, reply)
    assert reply.numbers == sorted({int(i) for i in numbers if len(i) <= 9 and 1 <= int(i) <= num_chunks})
