"""`python app.py` with no checkpoint starts on the embedded default, prints its loading
progress and URL, and answers through the API (select with `pytest -m embedded`)."""

import pytest
from gradio_client import Client

from model.embedded import best_variant

pytestmark = [pytest.mark.embedded, pytest.mark.server]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 12
NEEDLE_DOC = FILLER + "The special magic number is 7294. " + FILLER
MODEL = ("embedded SmolLM2-135M", 16, "mean")


def test_the_embedded_default_starts_compresses_and_answers(embedded_server, tmp_path):
    ratio, pooling = best_variant()  # the default: the shipped variant with the best card
    assert any(line.startswith(f"loading embedded SmolLM2-135M 1:{ratio} {pooling}") for line in embedded_server.lines)
    assert embedded_server.url.startswith("http://127.0.0.1:")
    client = Client(embedded_server.url, verbose=False, analytics_enabled=False, download_files=str(tmp_path))
    client.predict(NEEDLE_DOC, None, *MODEL, api_name="/load_document")
    summary, details = client.predict(*MODEL, api_name="/compress")
    assert details["latents"] == -(-details["tokens"] // 16) and "untrained" not in summary  # 1:16 mean ships
    job = client.submit(*MODEL, "What is the special magic number?", "lclm", True, "none", 24, api_name="/ask")
    job.result()
    results = job.outputs()[-1][7]
    assert "7294" in results["full context"]["answer"]
    assert results["LCLM 1:16 mean"]["ttft_ms"] > 0
    assert results["LCLM 1:16 mean"]["positions"] < results["full context"]["positions"] / 4
