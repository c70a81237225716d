"""`python app.py` with a login (LCLM_STUDIO_AUTH): a client without it is refused, one with it gets in."""

import pytest
from gradio_client import Client
from gradio_client.exceptions import AuthenticationError

from tests.studio.conftest import DOCUMENT, Server

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def private_url(tiny_checkpoint_factory, tmp_path_factory):
    server = Server(["--checkpoint", str(tiny_checkpoint_factory(ratio=4))], tmp_path_factory.mktemp("login-home"),
                    env={"LCLM_STUDIO_AUTH": "alice:s3cret:pass"})
    yield server.wait()
    server.stop()


def test_a_client_without_the_login_is_refused(private_url):
    with pytest.raises(AuthenticationError, match="credentials were not provided"):
        Client(private_url, verbose=False, analytics_enabled=False)
    with pytest.raises(ValueError) as err:  # gradio answers a wrong password with 400, not 401
        Client(private_url, auth=("alice", "wrong"), verbose=False, analytics_enabled=False)
    assert str(err.value) == f"Could not login to {private_url}."


def test_a_client_with_the_login_gets_in(private_url, tmp_path):
    client = Client(private_url, auth=("alice", "s3cret:pass"), verbose=False, analytics_enabled=False,
                    download_files=str(tmp_path))
    _, _, summary, _, _ = client.predict(DOCUMENT, None, "--checkpoint", 4, "mean", api_name="/load_document")
    assert "tokens in" in summary
