"""The one HTML-to-text parser (model.html_text), as document ingest and the training corpus use it."""

import gzip

import pytest

from app.ingest import read_bytes
from model.errors import UserError
from model.html_text import html_to_text
from model.training.data.corpus import read_text

PAGE = ("<!DOCTYPE html><html><head><title>Page</title><style>p{}</style></head><body>"
        "<nav><a href='/'>Home</a> <a href='/next'>Next</a></nav>"
        "<article><h1>Title</h1><p>First &amp;   second</p><script>alert(1)</script>"
        "<template><p>not shown</p></template><noscript>no script</noscript>"
        "<dl><dt>term</dt><dd>definition</dd></dl></article>after</body></html>")
PAGE_TEXT = "Title\n\nFirst & second\n\nterm\n\ndefinition\n\nafter"


def test_visible_text_only_blocks_on_their_own_lines():
    assert html_to_text(PAGE) == PAGE_TEXT


def test_blank_lines_collapse_and_surrounding_whitespace_goes():
    assert html_to_text("<body>  <p>One</p>\n\n\n<div> \t Two</div>  </body>") == "One\n\n Two"
    assert html_to_text("<article>a</article><article>b</article>") == "a\n\nb"


def test_unreadable_markup_is_a_user_error_naming_its_source():
    with pytest.raises(UserError, match=r"^page.html is not readable HTML \(unknown status keyword 'foo'"):
        html_to_text("<p>Hi</p><![foo[ bar", "page.html")


def test_ingest_and_the_corpus_read_a_page_alike(tmp_path):
    plain, packed = tmp_path / "page.html", tmp_path / "page.html.gz"
    plain.write_text(PAGE)
    packed.write_bytes(gzip.compress(PAGE.encode()))
    assert read_bytes(PAGE.encode(), "page.html") == read_text(plain) == read_text(packed) == PAGE_TEXT
