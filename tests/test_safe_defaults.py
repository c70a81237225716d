"""Safe defaults: the login and the open-address warning, the private upload directory and
uploads deleted once read, only safetensors loaded, and an owner-only latent cache."""

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from app.engine.service import Studio
from app.engine.settings import Settings
from app.studio.catalog import CHECKPOINT_FAMILY, Catalog, Variant
from app.studio.serving import (
    AUTH_ENV,
    auth_from,
    bind_warning,
    discard_upload,
    is_loopback,
    parse_auth,
    private_upload_dir,
    remove_stale_upload_dirs,
)
from app.studio.workspace import Workspace
from cache import LatentCache
from model.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
BAD_AUTH = "must be user:password with a non-empty user and password"


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---- login and bind address ------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    ("alice:secret", ("alice", "secret")),
    ("alice:pass:with:colons", ("alice", "pass:with:colons")),
    (" alice :secret", ("alice", "secret")),
    (None, None),
    ("", None),
])
def test_parse_auth(value, expected):
    assert parse_auth(value) == expected


@pytest.mark.parametrize("value", ["alice", "alice:", ":secret", "  :secret"])
def test_malformed_auth_is_refused(value):
    with pytest.raises(UserError) as err:
        parse_auth(value)
    assert str(err.value) == f"--auth {BAD_AUTH}"


def test_auth_flag_wins_over_the_environment():
    assert auth_from("bob:1", {AUTH_ENV: "carol:2"}) == ("bob", "1")
    assert auth_from(None, {AUTH_ENV: "carol:2"}) == ("carol", "2")
    assert auth_from(None, {}) is None
    with pytest.raises(UserError) as err:
        auth_from(None, {AUTH_ENV: "carol"})
    assert str(err.value) == f"{AUTH_ENV} {BAD_AUTH}"


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.1.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.20", False), ("studio.example.org", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_open_address_without_login_warns():
    assert bind_warning("127.0.0.1", None) is None
    assert bind_warning("0.0.0.0", ("alice", "secret")) is None
    assert bind_warning("0.0.0.0", None) == (
        "warning: binding 0.0.0.0 without --auth: anyone who can reach this address can read the documents and "
        "run the models; give --auth user:password (or set LCLM_STUDIO_AUTH)")


def run_app(*args, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "app.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_app_refuses_a_malformed_login_in_one_line():
    done = run_app("--auth", "alice")
    assert done.returncode == 2 and done.stderr.splitlines() == [f"error: --auth {BAD_AUTH}"]
    done = run_app(env={AUTH_ENV: ":secret"})
    assert done.returncode == 2 and done.stderr.splitlines() == [f"error: {AUTH_ENV} {BAD_AUTH}"]


@pytest.mark.slow
def test_app_warns_before_anything_else_when_open_without_login(tmp_path):
    missing = tmp_path / "missing"  # stops the start right after the warning, before anything binds
    done = run_app("--host", "0.0.0.0", "--checkpoint", str(missing), env={AUTH_ENV: ""})
    assert done.returncode == 2
    assert done.stderr.splitlines() == [bind_warning("0.0.0.0", None), f"error: checkpoint {missing} not found: no "
                                        "such directory, and not a model hub id"]


# ---- uploads --------------------------------------------------------------------------------
@pytest.fixture
def upload_dir(monkeypatch, tmp_path):
    """private_upload_dir() inside tmp_path, with its exit hook captured instead of registered."""
    hooks = []
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setattr("atexit.register", lambda fn, *args, **kwargs: hooks.append((fn, args, kwargs)))
    directory = private_upload_dir()
    yield directory, hooks
    for fn, args, kwargs in hooks:
        fn(*args, **kwargs)


def test_upload_dir_is_private_and_removed_at_exit(upload_dir, tmp_path):
    directory, hooks = upload_dir
    assert directory.parent == tmp_path / "gradio" and mode(directory) == 0o700
    assert os.environ["GRADIO_TEMP_DIR"] == str(directory)
    (directory / "abc").mkdir()
    (directory / "abc" / "left.txt").write_text("x")
    for fn, args, kwargs in hooks:
        fn(*args, **kwargs)
    assert not directory.exists()


def ended_process_id() -> int:
    """The id of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def running_process():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process
    process.kill()
    process.wait()


def upload_dir_of(parent: Path, pid: int, letters: str = "a1b2c3d4") -> Path:
    directory = parent / f"lclm-studio-uploads-{pid}-{letters}"
    (directory / "sha").mkdir(parents=True)
    (directory / "sha" / "left-behind.txt").write_text("a document")
    return directory


def test_start_up_removes_the_upload_directories_of_dead_studios(monkeypatch, tmp_path, running_process):
    parent = tmp_path / "gradio"
    dead = upload_dir_of(parent, ended_process_id())
    live = upload_dir_of(parent, running_process.pid)
    reused = upload_dir_of(parent, running_process.pid, "e5f6g7h8")  # the id now belongs to a newer process
    started = psutil.Process(running_process.pid).create_time()
    os.utime(reused, (started - 60, started - 60))
    elsewhere = upload_dir_of(tmp_path / "elsewhere", ended_process_id())
    link = parent / f"lclm-studio-uploads-{ended_process_id()}-linklink"
    link.symlink_to(elsewhere, target_is_directory=True)
    old_style = parent / "lclm-studio-uploads-x1y2z3ab"  # no process id in the name: whose it is, is unknown
    old_style.mkdir()
    unrelated = parent / "gradio-cache-123-abc"
    unrelated.mkdir()
    kept = [live, link, old_style, unrelated]
    if os.geteuid() == 0:
        others = upload_dir_of(parent, ended_process_id(), "otheruser")
        os.chown(others, 65534, 65534)
        kept.append(others)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(parent))
    monkeypatch.setattr("atexit.register", lambda *args, **kwargs: None)
    directory = private_upload_dir()
    assert not dead.exists() and not reused.exists()
    assert all(path.exists() for path in kept) and (elsewhere / "sha" / "left-behind.txt").is_file()
    assert directory.name.startswith(f"lclm-studio-uploads-{os.getpid()}-")
    assert remove_stale_upload_dirs(parent) == []  # its own directory, just made, is not stale


def test_exports_are_written_inside_the_private_upload_directory(upload_dir):
    directory, _ = upload_dir
    variant = Variant(CHECKPOINT_FAMILY, "unused", 4, "mean", trained=False)
    workspace = Workspace(Studio(Settings(device="cpu")), Catalog([variant]))
    assert directory in workspace.export("session", "csv").parents  # so removed with it, at exit or at the next start


def test_only_uploads_are_discarded(upload_dir, tmp_path):
    directory, _ = upload_dir
    upload = directory / "sha" / "notes.txt"
    upload.parent.mkdir()
    upload.write_text("x")
    elsewhere = tmp_path / "notes.txt"
    elsewhere.write_text("x")
    discard_upload(upload)
    discard_upload(elsewhere)
    discard_upload(directory / ".." / "notes.txt")
    assert not upload.parent.exists() and directory.is_dir() and elsewhere.is_file()


@pytest.mark.parametrize("content, message", [("Some text.", None), ("   ", "notes.txt is empty or only whitespace")])
def test_an_upload_is_deleted_once_read_even_when_refused(upload_dir, content, message):
    directory, _ = upload_dir
    upload = directory / "sha" / "notes.txt"
    upload.parent.mkdir()
    upload.write_text(content)
    variant = Variant(CHECKPOINT_FAMILY, "unused", 4, "mean", trained=False)
    workspace = Workspace(Studio(Settings(device="cpu")), Catalog([variant]))
    workspace.layout = lambda doc_id, variant: None  # no model needed to see the file go
    if message is None:
        document, _ = workspace.load_document(None, str(upload), variant)
        assert document.text == content and document.name == "notes.txt"
    else:
        with pytest.raises(UserError, match=f"^{message}$"):
            workspace.load_document(None, str(upload), variant)
    assert not upload.exists() and not upload.parent.exists()


# ---- weights and cache ------------------------------------------------------------------------
def test_no_module_unpickles():
    """torch.load and pickle are not called anywhere in the studio's code (the loader and the cache
    refuse pickles, see test_bad_input.py and test_cache.py)."""
    unpickling = re.compile(r"(?<![\w.])torch\.load\(|\bpickle\.loads?\(|^\s*(import|from) (pickle|dill)\b", re.M)
    sources = [p for d in ("app", "model", "cache", "views", "bench") for p in (ROOT / d).rglob("*.py")]
    offenders = [str(p.relative_to(ROOT)) for p in sources + [ROOT / "app.py"] if unpickling.search(p.read_text())]
    assert len(sources) > 20 and offenders == []
    assert unpickling.search("x = torch.load(f)") and not unpickling.search("safetensors.torch.load(blob)")


def test_new_cache_dir_is_owner_only_under_a_permissive_umask(tmp_path):
    old = os.umask(0o000)
    try:
        with LatentCache(tmp_path / "home" / "latent-cache"):
            pass
    finally:
        os.umask(old)
    assert mode(tmp_path / "home" / "latent-cache") == 0o700
