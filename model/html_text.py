"""The visible text of an HTML page: blocks on their own lines, blank lines between paragraphs;
scripts, styles, templates, the head and navigation skipped. Used by document ingest (app.ingest)
and by the training corpus (model.training.data.corpus)."""

from __future__ import annotations

import html.parser
import re

from model.errors import UserError


class _VisibleText(html.parser.HTMLParser):
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre", "table",
             "dt", "dd"}
    SKIP = {"script", "style", "noscript", "template", "head", "nav"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def html_to_text(markup: str, source: str = "the page") -> str:
    """The visible text of `markup`, runs of spaces and tabs as one space, at most one blank line
    in a row, no surrounding whitespace. Markup that html.parser gives up on is a UserError that
    names `source`."""
    parser = _VisibleText()
    try:
        parser.feed(markup)
        parser.close()
    except (AssertionError, ValueError) as err:  # html.parser gives up on some malformed markup
        raise UserError(f"{source} is not readable HTML ({err})") from None
    text = re.sub(r"[ \t]+", " ", "".join(parser.parts))
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()
