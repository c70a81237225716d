"""The bounded load test (bench/load.py) against `python app.py` on tiny checkpoints: every
concurrent request completes, answers as a single user would get, and the server's memory
does not grow across the run."""

import json

import pytest

from bench.load import CHECKPOINT_MODEL, main, run

pytestmark = [pytest.mark.server, pytest.mark.slow]

RSS_GROWTH_LIMIT_MIB = 200


def test_concurrent_sessions_all_complete_with_single_user_answers(studio_server):
    result = run(studio_server.url, studio_server.process.pid, CHECKPOINT_MODEL, sessions=3, questions=2,
                 max_new_tokens=8, timeout_s=60)
    assert result["requests"] == result["completed"] == 6
    assert result["answers_match_single_user"], result["mismatches"]
    assert all(a["answer"] for a in result["answers"])
    assert result["server_rss_mib"]["growth"] < RSS_GROWTH_LIMIT_MIB, result["server_rss_mib"]


def test_the_command_line_writes_its_results(studio_server, tmp_path):
    out = tmp_path / "load.json"
    assert main(["--url", studio_server.url, "--pid", str(studio_server.process.pid), "--family", "checkpoint",
                 "--sessions", "2",
                 "--questions", "1", "--rounds", "2", "--max-new-tokens", "4", "--timeout", "60",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["requests"] == 4 and result["answers_match_single_user"]  # 2 sessions x 1 question x 2 rounds
    assert {"before", "after", "growth", "growth_after_the_first_round"} <= set(result["server_rss_mib"])
    assert len(result["server_rss_mib"]["after_each_round"]) == 2
