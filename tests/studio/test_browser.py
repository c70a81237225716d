"""A real browser (Debian's chromium driven by Playwright) through every tab: paste a document,
compress it, see the latent map render, reconstruct, ask a question and see an answer and
a TTFT number, sweep. A screenshot of each tab is taken into the test's temporary folder;
with LCLM_SCREENSHOTS=1 the test runs on the embedded default instead of tiny checkpoints and
writes them to docs/screenshots/ (the committed ones, shown in the README and docs/studio.md)."""

import os
import re
from pathlib import Path

import pytest

from tests.studio.conftest import DOCUMENT, ROOT

pytest.importorskip("pytest_playwright")
from playwright.sync_api import Page, expect  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.slow]

TIMEOUT_MS = 60_000
SCREENSHOTS = os.environ.get("LCLM_SCREENSHOTS") == "1"
# The committed screenshots show a real document nobody here wrote: Debian's "Users and Groups"
# (base-passwd), where the machine has it; the test's own document otherwise.
REAL_DOCUMENT = Path("/usr/share/doc/base-passwd/users-and-groups.html")
REAL_QUESTION = "What is the shell of user sync?"  # /bin/sync


def document_and_question() -> tuple[str, str]:
    if SCREENSHOTS and REAL_DOCUMENT.is_file():
        from app.ingest import read_file

        return read_file(str(REAL_DOCUMENT)), REAL_QUESTION
    return DOCUMENT, "What is the vault code?"


@pytest.fixture
def url(request) -> str:
    """The studio on tiny checkpoints; on the embedded default when taking the committed screenshots."""
    return request.getfixturevalue("embedded_server" if SCREENSHOTS else "studio_server").url


@pytest.fixture
def shots(tmp_path):
    directory = ROOT / "docs" / "screenshots" if SCREENSHOTS else tmp_path
    directory.mkdir(parents=True, exist_ok=True)

    def shoot(page: Page, name: str) -> None:
        page.wait_for_timeout(300)  # let plots and tables settle
        page.screenshot(path=str(directory / f"{name}.png"), full_page=True)

    return shoot


def open_tab(page: Page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_paste_compress_map_reconstruct_ask_and_sweep(page: Page, url, shots):
    page.set_viewport_size({"width": 1360, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    page.goto(url)

    # Document: paste and load; the document appears as a strip of chunks
    document, question = document_and_question()
    page.locator("#document-text textarea").fill(document)
    page.locator("#load-document").click()
    expect(page.locator("#document-summary")).to_contain_text("tokens in")
    expect(page.locator("#document-strip .lclm-cell").first).to_be_visible()
    shots(page, "1-document")

    # Compress: the result names the latent count and the time
    open_tab(page, "Compress")
    page.locator("#compress").click()
    expect(page.locator("#compress-summary")).to_contain_text("decoder positions saved")
    shots(page, "2-compress")

    # Latents: the UMAP map renders (with another ratio and the source tokens overlaid)
    open_tab(page, "Latents")
    page.locator("#other-ratios").get_by_label("1:8").check()
    page.locator("#show-source").get_by_role("checkbox").check()
    page.locator("#colour-by").get_by_label("content").check()
    page.locator("#draw-map").click()
    expect(page.locator("#latent-summary")).to_contain_text("UMAP of")
    expect(page.locator("#latent-summary")).to_contain_text("Its latents' text:")
    expect(page.locator("#latent-map")).to_contain_text(re.compile(r"(prose|names|numbers|code) \(latents"))
    expect(page.locator("#latent-caption")).to_contain_text("neighbourhoods, not distances")
    expect(page.locator("#latent-map .js-plotly-plot .scatterlayer, #latent-map .js-plotly-plot canvas").first
           ).to_be_attached()
    expect(page.locator("#latent-stats .js-plotly-plot")).to_be_visible()
    shots(page, "3-latents")

    # Reconstruction: side by side with 1:8; fidelity strips and a token diff
    open_tab(page, "Reconstruction")
    page.locator("#compare-ratio input").click()
    page.get_by_role("option", name="1:8").click()
    page.locator("#max-chunks input").fill("4")
    page.locator("#reconstruct").click()
    expect(page.locator("#reconstruction-left-title")).to_contain_text("token accuracy")
    expect(page.locator("#reconstruction-left-title")).to_contain_text(re.compile(r"chunks of \d+ tokens"))
    expect(page.locator("#reconstruction-right-title")).to_contain_text("1:8")
    expect(page.locator("#fidelity-left .lclm-cell")).to_have_count(4)
    shots(page, "4-reconstruction")

    # Ask: an answer streams, with a TTFT number; EXPAND's transcript and the full-context answer beside it
    open_tab(page, "Ask")
    page.locator("#question textarea").fill(question)
    page.locator("#latent-method").get_by_label("LCLM + EXPAND").check()
    page.locator("#compare-full").get_by_role("checkbox").check()
    page.locator("#max-new-tokens input").fill("12")
    expect(page.locator("#answer-kvpress")).to_be_hidden()  # only the boxes asked for
    page.locator("#ask").click()
    expect(page.locator("#answer-lclm")).to_contain_text(re.compile(r"LCLM 1:\d+ \w+ \+ EXPAND"))  # who answers
    expect(page.locator("#ttft")).to_contain_text(re.compile(r"full context.*TTFT [\d,.]+ ms", re.S))
    expect(page.locator("#ttft")).to_contain_text(re.compile(r"EXPAND.*(TTFT|first directive) [\d,.]+ ms", re.S))
    page.wait_for_function("['#answer-lclm', '#answer-full'].some("
                           "id => document.querySelector(id + ' textarea').value.length > 0)")
    expect(page.locator("#transcript")).to_contain_text(re.compile(r"expand|demoted"))
    expect(page.locator("#ask-readout")).not_to_contain_text(re.compile(r"running|waiting"), timeout=180_000)
    shots(page, "5-ask")

    # Metrics: the history holds both answers; a sweep draws TTFT and memory against length
    open_tab(page, "Metrics")
    expect(page.locator("#history")).to_contain_text("full context")
    page.locator("#sweep").click()
    expect(page.locator("#sweep-chart .js-plotly-plot .legend")).to_contain_text("full context", timeout=120_000)
    expect(page.locator("#sweep-chart .js-plotly-plot")).to_contain_text("TTFT")
    shots(page, "6-metrics")
