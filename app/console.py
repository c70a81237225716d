"""What reaches the user's terminal from the CLI and the studio's server: our own warnings, one
`warning: ...` line each on stderr, and nothing of the libraries' warnings (transformers'
"Token indices sequence length is longer than ...", Python warnings from torch and the rest),
which would otherwise come ahead of our one `error: ...` line. A library condition that matters
is checked by our code and told in our words (the document's token limit, the decoder's positions)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

OUR_LOGGERS = ("app", "cache", "model", "views", "bench")
# Libraries that print through handlers of their own, and the variable each reads, when first
# imported, for its level; a user who sets the variable keeps the level chosen.
LIBRARY_VERBOSITY = {"transformers": "TRANSFORMERS_VERBOSITY", "huggingface_hub": "HF_HUB_VERBOSITY"}


class LineFormatter(logging.Formatter):
    """`warning: <message>` (or `error: ...`), the form of every line we print."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {super().format(record)}"


@contextlib.contextmanager
def user_terminal() -> Iterator[None]:
    """For the length of a command (or the server's life): our loggers' warnings as lines on stderr,
    library loggers and Python warnings silenced. Everything is put back on exit."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter())
    ours = [logging.getLogger(name) for name in OUR_LOGGERS]
    libraries = {name: variable for name, variable in LIBRARY_VERBOSITY.items() if variable not in os.environ}
    root = logging.getLogger()
    silent = logging.NullHandler()  # with a handler on the root, Python prints no unhandled library record
    saved_levels = [(logger, logger.level) for logger in ours + [logging.getLogger(name) for name in libraries]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in ours:
            logger.addHandler(handler)
            logger.setLevel(min(logger.getEffectiveLevel(), logging.WARNING))
        for name, variable in libraries.items():
            os.environ[variable] = "error"  # for a library imported from now on
            logging.getLogger(name).setLevel(logging.ERROR)  # for one imported already
        root.addHandler(silent)
        try:
            yield
        finally:
            root.removeHandler(silent)
            for logger in ours:
                logger.removeHandler(handler)
            for logger, level in saved_levels:
                logger.setLevel(level)
            for variable in libraries.values():
                os.environ.pop(variable, None)
