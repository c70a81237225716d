"""The offline training corpus: text that this machine's package managers installed.

Each source is a small registered class that yields (doc_id, text) pairs. Nothing is
downloaded at run time: Debian documentation comes from `apt-get install` (see
DEBIAN_PACKAGES), Python source from packages already installed in the environment.

Never used, in training or evaluation: the licence texts in /usr/share/common-licenses
(kept for independent evaluation). Licence files, Debian copyright files and paragraphs
that quote a licence are removed from every document (`strip_licence_text`).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from model.html_text import html_to_text

COMMON_LICENSES = Path("/usr/share/common-licenses")

# Debian documentation packages used by `prepare`, with their licences (from each
# package's /usr/share/doc/<package>/copyright). Install: apt-get install <names>.
DEBIAN_PACKAGES = {
    "python3.11-doc": "PSF-2.0 (Python Software Foundation License)",
    "debian-reference-en": "GPL-2+",
    "debian-handbook": "GPL-2.0+ or CC-BY-SA-3.0",
    "linux-doc-6.1": "GPL-2 (pulled in by linux-doc)",
}

# File names that hold licence or copyright text: never read.
LICENCE_NAME = re.compile(r"(^|[-_.])(licen[cs]e|copying|copyright|notice|authors)([-_.]|$)", re.IGNORECASE)
# Phrases that mark a paragraph as (part of) a licence text: such paragraphs are dropped.
LICENCE_MARKERS = (
    "gnu general public license", "gnu lesser general public", "gnu free documentation license",
    "apache license", "licensed under the", "mozilla public license", "permission is hereby granted",
    "redistribution and use in source and binary forms", "this program is free software",
    "warranty", "spdx-license-identifier", "creative commons", "python software foundation license",
    "all rights reserved",
)


def strip_licence_text(text: str) -> str:
    """Drop every paragraph (blank-line separated block) that quotes or points at a licence."""
    kept = [p for p in re.split(r"\n\s*\n", text) if not any(m in p.lower() for m in LICENCE_MARKERS)]
    return "\n\n".join(kept).strip()


def is_licence_file(path: Path) -> bool:
    if COMMON_LICENSES in path.parents or path == COMMON_LICENSES:
        return True
    return any(LICENCE_NAME.search(part) for part in path.parts[-2:])


def read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    text = data.decode("utf-8", errors="replace")
    if path.name.endswith((".html", ".html.gz", ".htm")):
        text = html_to_text(text, str(path))
    return text


def stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


@dataclass
class CorpusDocument:
    source: str
    doc_id: str  # path or module name, unique within the source
    text: str


class Source:
    """A named set of documents with one licence statement (`name`, `licence`)."""

    name: str
    licence: str

    def documents(self) -> Iterator[CorpusDocument]:
        raise NotImplementedError

    def available(self) -> bool:
        return True


@dataclass
class FileTreeSource(Source):
    """Files under some roots that match glob patterns (sorted, deterministic)."""

    name: str
    licence: str
    roots: list[str]
    patterns: list[str]
    exclude: list[str] = field(default_factory=list)  # regexes on the path

    def files(self) -> list[Path]:
        found = set()
        for root in map(Path, self.roots):
            for pattern in self.patterns:
                found.update(p for p in root.glob(pattern) if p.is_file())
        kept = [p for p in found if not is_licence_file(p) and not any(re.search(x, str(p)) for x in self.exclude)]
        return sorted(kept, key=lambda p: stable_hash(str(p)))  # a fixed shuffle: a token cap samples evenly

    def available(self) -> bool:
        return any(Path(r).is_dir() for r in self.roots)

    def documents(self) -> Iterator[CorpusDocument]:
        for path in self.files():
            yield CorpusDocument(self.name, str(path), read_text(path))


@dataclass
class PythonPackagesSource(Source):
    """Source files of installed Python distributions (or stdlib packages), licence from their metadata."""

    name: str
    packages: list[str]
    licence: str = ""

    def __post_init__(self) -> None:
        if not self.licence:
            self.licence = "; ".join(f"{p}: {package_licence(p)}" for p in self.packages)

    def files(self) -> list[tuple[str, Path]]:
        found = []
        for package in self.packages:
            spec = importlib.util.find_spec(package)
            if spec is None:
                raise ValueError(f"Python package {package!r} is not installed")
            for root in map(Path, spec.submodule_search_locations or [Path(spec.origin).parent]):
                found += [(f"{package}:{p.relative_to(root)}", p) for p in root.rglob("*.py")
                          if not is_licence_file(p) and "/tests/" not in str(p)]
        return sorted(found, key=lambda item: stable_hash(item[0]))  # a fixed shuffle across packages

    def documents(self) -> Iterator[CorpusDocument]:
        for doc_id, path in self.files():
            yield CorpusDocument(self.name, doc_id, read_text(path))


def package_licence(package: str) -> str:
    """Licence of an installed distribution from its metadata; stdlib modules are PSF-2.0."""
    dist = {"sklearn": "scikit-learn"}.get(package, package)
    try:
        meta = importlib.metadata.metadata(dist)
    except importlib.metadata.PackageNotFoundError:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin and "site-packages" not in spec.origin:
            return "PSF-2.0 (Python standard library)"
        return "unknown"
    return meta.get("License-Expression") or next(
        (c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License ::")),
        (meta.get("License") or "unknown").splitlines()[0][:80],
    )


def debian_sources() -> list[Source]:
    """The Debian documentation packages (DEBIAN_PACKAGES), English only."""
    return [
        FileTreeSource("python3.11-doc", DEBIAN_PACKAGES["python3.11-doc"], ["/usr/share/doc/python3.11/html/_sources"],
                       ["**/*.rst.txt"], exclude=[r"/(license|copyright|bugs|about)\.rst\.txt$", r"/whatsnew/changelog"]),
        FileTreeSource("debian-reference-en", DEBIAN_PACKAGES["debian-reference-en"], ["/usr/share/debian-reference"],
                       ["*.en.html"]),
        FileTreeSource("debian-handbook", DEBIAN_PACKAGES["debian-handbook"], ["/usr/share/doc/debian-handbook/html/en-US"],
                       ["*.html"], exclude=[r"/(index|pr01|pr02|legalnotice|ix01)[^/]*\.html$"]),
        FileTreeSource("linux-doc-6.1", DEBIAN_PACKAGES["linux-doc-6.1"], ["/usr/share/doc/linux-doc-6.1/Documentation"],
                       ["**/*.rst.gz", "**/*.txt.gz"], exclude=[r"/(LICENSES|translations|devicetree|ABI)/", r"license-rules"]),
    ]


# Python packages whose source goes into the corpus (all in requirements.txt, permissive licences).
PYTHON_PACKAGES = ["transformers", "accelerate", "peft", "tqdm", "safetensors", "diskcache", "json", "email", "asyncio"]


def default_sources() -> list[Source]:
    return [*debian_sources(), PythonPackagesSource("python-source", PYTHON_PACKAGES)]


def clean(text: str, forbidden: list[str]) -> str:
    """Licence paragraphs removed; special-token strings of the tokenizer removed."""
    text = strip_licence_text(text)
    for token in forbidden:
        text = text.replace(token, "")
    return text


def split_of(doc: CorpusDocument, validation_permille: int) -> str:
    """Deterministic train/validation split by a hash of the document's identity."""
    return "validation" if stable_hash(f"{doc.source}:{doc.doc_id}") % 1000 < validation_permille else "train"
