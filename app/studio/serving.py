"""Serving the studio safely: the login (`--auth` or LCLM_STUDIO_AUTH), the warning for an
open address without one, and a private directory for uploads, each upload deleted once read.

Gradio writes uploads under GRADIO_TEMP_DIR (by default a shared /tmp/gradio, mode 0o755);
`private_upload_dir` points it at a fresh 0o700 directory named after this process, removed when
the process exits, and first removes the ones that studios killed before they could (SIGKILL, a
crash) left behind. Call it before gradio is imported.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

import psutil

from model.errors import UserError

AUTH_ENV = "LCLM_STUDIO_AUTH"
UPLOAD_DIR_ENV = "GRADIO_TEMP_DIR"  # gradio reads it for uploads and its file cache
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
UPLOAD_DIR_PREFIX = "lclm-studio-uploads-"
UPLOAD_DIR_NAME = re.compile(rf"{UPLOAD_DIR_PREFIX}(\d+)-[^-]+")  # the owner's process id, then mkdtemp's letters


def parse_auth(value: str | None, source: str = "--auth") -> tuple[str, str] | None:
    """(user, password) from "user:password"; None for no value. The password may contain colons."""
    if value is None or value == "":
        return None
    user, sep, password = value.partition(":")
    if not sep or not user.strip() or not password:
        raise UserError(f"{source} must be user:password with a non-empty user and password")
    return user.strip(), password


def auth_from(flag: str | None, environ=os.environ) -> tuple[str, str] | None:
    """The login from --auth, else from LCLM_STUDIO_AUTH, else None."""
    if flag is not None:
        return parse_auth(flag, "--auth")
    return parse_auth(environ.get(AUTH_ENV), AUTH_ENV)


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    host = host.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another host name: it may resolve to any address
        return False


def bind_warning(host: str, auth: tuple[str, str] | None) -> str | None:
    """The warning to print when the studio would be open to the network without a login."""
    if auth is not None or is_loopback(host):
        return None
    return (f"warning: binding {host} without --auth: anyone who can reach this address can read the documents "
            f"and run the models; give --auth user:password (or set {AUTH_ENV})")


def private_upload_dir() -> Path:
    """A fresh owner-only directory for gradio's uploads (inside GRADIO_TEMP_DIR when set), made
    gradio's GRADIO_TEMP_DIR and removed at exit; stale ones of dead studios are removed first."""
    parent = os.environ.get(UPLOAD_DIR_ENV) or None
    if parent:
        os.makedirs(parent, exist_ok=True)
    remove_stale_upload_dirs(Path(parent or tempfile.gettempdir()))
    directory = Path(tempfile.mkdtemp(prefix=f"{UPLOAD_DIR_PREFIX}{os.getpid()}-", dir=parent))  # mode 0o700
    os.environ[UPLOAD_DIR_ENV] = str(directory)
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def remove_stale_upload_dirs(parent: Path) -> list[Path]:
    """Remove this user's upload directories in `parent` whose studio is no longer running: no
    process has their process id, or the one that has it started after the directory last changed
    (the id was reused). Links and other users' directories are left alone. Returns those removed."""
    removed = []
    for directory in sorted(parent.glob(f"{UPLOAD_DIR_PREFIX}*")):
        match = UPLOAD_DIR_NAME.fullmatch(directory.name)
        try:
            info = directory.lstat()
        except OSError:
            continue
        if not match or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        if not owner_alive(int(match.group(1)), info.st_mtime):
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed


def owner_alive(pid: int, changed: float) -> bool:
    """Whether process `pid` runs and may have made a directory last changed at `changed` (epoch s)."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= changed
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # it exists, but cannot be looked at: keep its directory
        return True


def discard_upload(path: str | Path) -> None:
    """Delete an uploaded file (and its folder, once empty). Only files inside the upload
    directory are touched: a path from anywhere else is left alone."""
    root = os.environ.get(UPLOAD_DIR_ENV)
    if not root:
        return
    root, path = Path(root).resolve(), Path(path).resolve()
    if root not in path.parents:
        return
    path.unlink(missing_ok=True)
    if path.parent != root:
        try:
            path.parent.rmdir()
        except OSError:  # not empty: another upload of the same content is still there
            pass
