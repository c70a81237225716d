"""Start-up time of the embedded default: first start (GGUF -> safetensors conversion, then
load) against later starts (load the converted safetensors). Run as `python -m bench.startup`.

Each run uses a fresh data directory for the first start and the same one for the second,
in a fresh process, so nothing is shared through Python's module cache."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

LOAD = (
    "import time; t = time.perf_counter(); from model.loading import load_lclm; "
    "load_lclm(None, ratio=16, device='cpu'); print(time.perf_counter() - t)"
)


def timed_start(data_dir: Path) -> float:
    env = {"LCLM_STUDIO_HOME": str(data_dir), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default="bench/results/startup.json")
    args = parser.parse_args()
    first, second = [], []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            first.append(timed_start(Path(tmp)))
            second.append(timed_start(Path(tmp)))
        print(f"run {run + 1}: first start {first[-1]:.1f} s, second start {second[-1]:.1f} s", flush=True)
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": __import__("os").cpu_count(),
        "runs": args.runs,
        "first_start_s": [round(x, 2) for x in first],
        "second_start_s": [round(x, 2) for x in second],
        "first_start_median_s": round(statistics.median(first), 2),
        "second_start_median_s": round(statistics.median(second), 2),
        "ratio_first_over_second": round(statistics.median(first) / statistics.median(second), 1),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
