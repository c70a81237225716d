"""The thread count the commands choose: one per core that other processes leave free."""

import pytest
import torch

from app.cli import main as cli_main
from model.threads import apply_threads, choose_threads, cores


def test_a_busy_core_is_left_to_its_process():
    available = cores()
    assert choose_threads(busy=0.0).threads == available
    assert choose_threads(busy=0.3).threads == available  # a little use elsewhere takes no core
    assert choose_threads(busy=0.6).threads == max(1, available - 1)
    assert choose_threads(busy=available + 3.0).threads == 1  # never fewer than one
    assert "cores free" in choose_threads(busy=0.0).reason


def test_an_asked_count_is_kept_and_set():
    before = torch.get_num_threads()
    try:
        choice = apply_threads(1)
        assert choice.threads == 1 and choice.reason == "asked for" and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="at least 1"):
        choose_threads(0)


def test_the_command_line_refuses_a_bad_thread_count(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("Some text.")
    assert cli_main(["compress", str(doc), "--threads", "0"]) == 2
    assert "threads must be at least 1" in capsys.readouterr().err
