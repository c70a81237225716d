"""`python app.py` starting over what earlier runs left: the upload directory of a studio killed
with SIGKILL (removed at start-up) and a damaged latent cache database (moved aside on first use,
with one warning line, and the request answered)."""

from __future__ import annotations

import signal

import pytest
from gradio_client import Client

from tests.studio.conftest import DOCUMENT, Server, wait_until

pytestmark = [pytest.mark.server, pytest.mark.slow]

MODEL = ("--checkpoint", 4, "mean")  # family, ratio, pooling


def test_a_restart_after_a_kill_and_a_damaged_cache(tiny_checkpoint_factory, tmp_path):
    checkpoint = str(tiny_checkpoint_factory(ratio=4))
    temp_root, home = tmp_path / "gradio", tmp_path / "home"
    env = {"GRADIO_TEMP_DIR": str(temp_root), "LCLM_STUDIO_AUTH": ""}
    killed = Server(["--checkpoint", checkpoint], home, env=env)
    client = Client(killed.wait(), verbose=False, analytics_enabled=False, download_files=str(tmp_path))
    client.predict(DOCUMENT, None, *MODEL, api_name="/load_document")
    reference = client.predict(*MODEL, api_name="/compress")[1]
    (left_behind,) = temp_root.glob("lclm-studio-uploads-*")
    killed.process.send_signal(signal.SIGKILL)  # no exit hook runs
    killed.process.wait(30)
    assert left_behind.is_dir()
    db = home / "latent-cache" / "cache.db"
    for log in db.parent.glob("cache.db-*"):  # the killed writer's write-ahead log: SQLite would read the
        log.unlink()  # newest pages from it and never see the damage below (whether it is there is timing)
    with db.open("r+b") as f:
        f.write(bytes(range(256)) * 32)  # 8 KiB of garbage over its header

    server = Server(["--checkpoint", checkpoint], home, env=env)
    try:
        client = Client(server.wait(), verbose=False, analytics_enabled=False, download_files=str(tmp_path))
        assert not left_behind.exists() and len(list(temp_root.glob("lclm-studio-uploads-*"))) == 1
        client.predict(DOCUMENT, None, *MODEL, api_name="/load_document")
        result = client.predict(*MODEL, api_name="/compress")[1]
        assert result["latents"] == reference["latents"] and result["cached"] is False
        (aside,) = home.glob("latent-cache.damaged-*")
        expected = (f"warning: latent cache: {db} is damaged (file is not a database); moved it aside to {aside} "
                    "and started a fresh cache")
        wait_until(lambda: expected in server.lines)
        assert [line for line in server.lines if line.startswith("warning")] == [expected]
        assert client.predict(*MODEL, api_name="/compress")[1]["cached"] is True
    finally:
        server.stop()
