"""What a lent GPU machine brings back: one variant's OUT/ and state.json packed in parts within
the return limits (`pack`), restored here (`unpack`), and what would not come back
(`return_problems`).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

PART_BYTES = 15 * 2**20  # one returned file: under the 16 MiB limit
RETURN_FILES, RETURN_BYTES, RETURN_FILE_BYTES = 8, 64 * 2**20, 16 * 2**20


def pack(variant: str, state_dir: Path, out: Path, dest: Path) -> list[Path]:
    """One variant's OUT/ (final/ in bf16, metrics.json, curve.png) and STATE/state.json as one tar
    in parts of at most PART_BYTES: DEST/<variant>.tar.0, .1, ... The tensors of STATE/ and the
    optimizer moments stay behind (fp32, several times final/); `unpack` and a later call continue
    from final/ with a fresh optimizer."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob(f"{variant}.tar.*"):
        old.unlink()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(state_dir / "state.json", arcname="state/state.json")
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            tar.add(path, arcname=f"out/{path.relative_to(out).as_posix()}")
    data = buffer.getvalue()
    parts = []
    for index, at in enumerate(range(0, len(data), PART_BYTES)):
        parts.append(dest / f"{variant}.tar.{index}")
        parts[-1].write_bytes(data[at:at + PART_BYTES])
    return parts


def unpack(variant: str, source: Path, state_dir: Path, out: Path) -> bool:
    """Restore a packed variant into STATE/ and OUT/ when it has trained more steps than the state
    already there (or there is none); True when it did."""
    parts = sorted(source.glob(f"{variant}.tar.*"), key=lambda p: int(p.suffix[1:]))
    if not parts:
        return False
    tar = tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts)))
    with tar:
        packed = json.loads(tar.extractfile("state/state.json").read())
        here = state_dir / "state.json"
        if here.is_file() and json.loads(here.read_text())["step"] >= packed["step"]:
            return False
        tmp = state_dir.with_name(state_dir.name + ".unpack")
        shutil.rmtree(tmp, ignore_errors=True)
        tar.extractall(tmp, filter="data")
    shutil.rmtree(state_dir, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    (tmp / "state").rename(state_dir)
    (tmp / "out").rename(out)
    shutil.rmtree(tmp)
    return True


def return_problems(dest: Path) -> list[str]:
    """What under DEST would not come back from the GPU machine (count, size per file, total)."""
    files = [p for p in dest.rglob("*") if p.is_file()]
    problems = [f"{p.name}: {p.stat().st_size / 2**20:.1f} MiB" for p in files if p.stat().st_size > RETURN_FILE_BYTES]
    if len(files) > RETURN_FILES:
        problems.append(f"{len(files)} files (at most {RETURN_FILES})")
    if (total := sum(p.stat().st_size for p in files)) > RETURN_BYTES:
        problems.append(f"{total / 2**20:.1f} MiB in all (at most {RETURN_BYTES // 2**20})")
    return problems
