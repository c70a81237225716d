"""The installable commands: pyproject.toml's console scripts point at real entry points,
`python -m app` and `python app.py` start the same studio launcher, the installed `lclm` and
`lclm-studio` (after `make install`) answer --help, and importing the UI package imports no
gradio before the launcher has made the private upload directory."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_console_scripts_name_callables():
    assert set(SCRIPTS) == {"lclm", "lclm-studio"}
    for target in SCRIPTS.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


@pytest.mark.parametrize("command", [["-m", "app"], ["app.py"]])
def test_the_studio_starts_the_same_way_from_every_entry(command):
    done = run(sys.executable, *command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: lclm-studio"), done.stdout
    assert "--port" in done.stdout


def test_installed_commands_answer_help():
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "lclm").exists():
        pytest.skip("the project is not installed in this environment (make install runs pip install -e .)")
    for name, usage in (("lclm", "usage: lclm "), ("lclm-studio", "usage: lclm-studio")):
        done = run(str(bin_dir / name), "--help")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(usage), done.stdout


def test_importing_the_ui_package_and_launcher_imports_no_gradio():
    done = run(sys.executable, "-c", "import sys, views, views.launch; print('gradio' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_make_run_passes_the_port():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    done = run("make", "-n", "run", "PORT=8123")
    assert done.returncode == 0, done.stderr
    assert "lclm-studio --port 8123" in done.stdout
