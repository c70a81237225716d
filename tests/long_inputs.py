"""Long real inputs for the tests: text from this machine's own documentation
(`bench.long_document.machine_text`: the licence texts and the packages' copyright files), or
the test is skipped; `bench.long_document.machine_pdf` makes a PDF of many pages of it."""

from __future__ import annotations

import pytest

from bench.long_document import machine_text


def long_text(tokens: int, tokenizer=None) -> str:
    """About `tokens` tokens of the machine's documentation (exactly, with `tokenizer`); the test
    is skipped where the machine has none (not a Debian system)."""
    try:
        return machine_text(tokens, tokenizer)
    except SystemExit as missing:
        pytest.skip(str(missing))
