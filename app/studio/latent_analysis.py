"""What the latents hold, as numbers: 2-D projections (UMAP) of latents and of the decoder's
embeddings of the source tokens, latent norms and neighbour similarity along the document,
and a token-level diff between a chunk and its reconstruction."""

from __future__ import annotations

import bisect
import difflib
import re
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from app.studio.documents import preview

UMAP_MIN_POINTS = 8  # below this UMAP's neighbour graph is meaningless: use PCA
MAX_SOURCE_POINTS = 1500  # source-token embeddings are subsampled evenly to this many
MAX_MAP_LATENTS = 3000  # latents per set drawn on the map (a long document's are subsampled evenly)
HOVER_CHARS = 120


CONTENT_CLASSES = ("numbers", "code", "names", "prose", "punctuation and space")
CODE_MARKS = re.compile(r"[{}()\[\];=<>_#/\\|`$]|\bdef\b|\breturn\b|::|->")
WORD = re.compile(r"[^\W\d_]+")


def content_class(text: str) -> str:
    """What a span of text mostly is, by simple surface rules: numbers (a third of its letters and
    digits are digits), code (brackets, operators, keywords), names (most words capitalised),
    prose, or punctuation and space (no letter or digit)."""
    alnum = [c for c in text if c.isalnum()]
    if not alnum:
        return "punctuation and space"
    if sum(c.isdigit() for c in alnum) >= len(alnum) / 3:
        return "numbers"
    if len(CODE_MARKS.findall(text)) >= max(2, len(text) // 25):
        return "code"
    words = WORD.findall(text)
    if words and sum(w[0].isupper() for w in words) > len(words) / 2:
        return "names"
    return "prose"


@dataclass
class PointSet:
    """Vectors to project, with what a hover shows and where each sits in the document."""

    name: str  # legend entry, e.g. "latents 1:16" or "source tokens"
    vectors: np.ndarray  # [n, D] float32
    positions: np.ndarray  # [n] in [0, 1]: centre of the source span over the document length
    texts: list[str]  # [n] source text behind each point
    chunks: list[int] = None  # [n] the EXPAND chunk (from 1) each point's text starts in, where known

    @property
    def classes(self) -> list[str]:
        """[n] the content class of each point's text (content_class)."""
        return [content_class(t) for t in self.texts]


@dataclass
class Projection:
    sets: list[PointSet]
    coords: list[np.ndarray]  # [n_i, 2] per set
    method: str  # "UMAP" or "PCA"


def latent_set(name: str, latents: torch.Tensor, spans: list[tuple[int, int]], document,
               chunk_starts: list[int] | None = None) -> PointSet:
    """latents: [M, D]; spans: encoder-token range [start, end) behind each latent; chunk_starts:
    the first character of each EXPAND chunk, in order (to say which chunk a latent is from)."""
    length = max(1, len(document.text))
    centres = [(document.offsets[s][0] + document.offsets[e - 1][1]) / 2 for s, e in spans]
    return PointSet(
        name=name,
        vectors=latents.detach().float().cpu().numpy(),  # [M, D]
        positions=np.asarray(centres, dtype=np.float32) / length,  # [M]
        texts=[preview(document.text_of(s, e), HOVER_CHARS) for s, e in spans],
        chunks=[chunk_of(document.offsets[s][0], chunk_starts) for s, _ in spans] if chunk_starts else None,
    )


def chunk_of(char: int, chunk_starts: list[int]) -> int:
    """The chunk number (from 1) holding character `char`, given each chunk's first character."""
    return max(1, bisect.bisect_right(chunk_starts, char))


def subsample(points: PointSet, limit: int = MAX_MAP_LATENTS) -> PointSet:
    """At most `limit` points of the set, evenly along the document (all of them when fewer)."""
    n = len(points.texts)
    if n <= limit:
        return points
    keep = np.unique(np.linspace(0, n - 1, num=limit).astype(int))  # [limit]
    return PointSet(points.name, points.vectors[keep], points.positions[keep], [points.texts[i] for i in keep],
                    [points.chunks[i] for i in keep] if points.chunks else None)


def source_token_set(model, text: str, limit: int = MAX_SOURCE_POINTS) -> PointSet:
    """The decoder's input embeddings of the document's decoder tokens, evenly subsampled."""
    encoded = model.decoder_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    keep = np.unique(np.linspace(0, len(ids) - 1, num=min(limit, len(ids))).astype(int)) if ids else []
    weight = model.decoder.get_input_embeddings().weight  # [vocab, D]
    with torch.inference_mode():
        vectors = weight[torch.as_tensor([ids[i] for i in keep], dtype=torch.long, device=weight.device)]  # [n, D]
    length = max(1, len(text))
    return PointSet(
        name="source tokens (decoder embeddings)",
        vectors=vectors.float().cpu().numpy(),
        positions=np.asarray([(offsets[i][0] + offsets[i][1]) / 2 / length for i in keep], dtype=np.float32),
        texts=[repr(text[offsets[i][0]:offsets[i][1]]) for i in keep],
    )


def project(vectors: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """[n, D] -> ([n, 2], method): UMAP (cosine metric), or PCA for very few points."""
    n = vectors.shape[0]
    if n < UMAP_MIN_POINTS:
        return pca(vectors), "PCA"
    import umap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by random_state", small-graph notes
        reducer = umap.UMAP(n_neighbors=min(15, n - 1), n_components=2, metric="cosine", random_state=seed,
                            init="spectral" if n > 16 else "random")
        coords = reducer.fit_transform(vectors)  # [n, 2]
    return np.asarray(coords, dtype=np.float32), "UMAP"


def pca(vectors: np.ndarray) -> np.ndarray:
    """[n, D] -> [n, 2]: the first two principal components (zeros where undefined)."""
    centred = vectors - vectors.mean(axis=0, keepdims=True)  # [n, D]
    coords = np.zeros((vectors.shape[0], 2), dtype=np.float32)
    if vectors.shape[0] > 1:
        _, _, vt = np.linalg.svd(centred, full_matrices=False)  # vt: [min(n, D), D]
        k = min(2, vt.shape[0])
        coords[:, :k] = centred @ vt[:k].T  # [n, k]
    return coords


def project_sets(sets: list[PointSet]) -> Projection:
    """One projection of all sets together, so that they share a map."""
    widths = {s.vectors.shape[1] for s in sets}
    if len(widths) != 1:
        raise ValueError(f"point sets of different widths {sorted(widths)} cannot share a map")
    coords, method = project(np.concatenate([s.vectors for s in sets]))
    splits = np.cumsum([len(s.vectors) for s in sets])[:-1]
    return Projection(sets, list(np.split(coords, splits)), method)


def latent_statistics(latents: torch.Tensor) -> dict[str, np.ndarray]:
    """latents: [M, D] -> per latent: L2 norm, cosine similarity to the previous and next latent
    (NaN where there is none)."""
    x = latents.detach().float().cpu()  # [M, D]
    norms = x.norm(dim=-1)  # [M]
    nan = torch.full((1,), float("nan"))
    if x.shape[0] > 1:
        neighbour = torch.nn.functional.cosine_similarity(x[1:], x[:-1], dim=-1)  # [M-1]: latent i vs i-1
    else:
        neighbour = torch.empty(0)
    return {
        "norm": norms.numpy(),
        "cos_prev": torch.cat([nan, neighbour]).numpy(),  # [M]
        "cos_next": torch.cat([neighbour, nan]).numpy(),  # [M]
    }


# ---- token-level diff of a reconstruction -------------------------------------------------
def token_pieces(tokenizer, text: str) -> tuple[list[int], list[str]]:
    """Token ids of `text` and the source text of each token (pieces join back to `text`)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    starts = [0] + [start for start, _ in offsets[1:]]
    ends = starts[1:] + [len(text)]
    pieces = [text[s:e] for s, e in zip(starts, ends)]
    return list(ids), pieces


def token_diff(tokenizer, original: str, reconstructed: str) -> list[tuple[str, str]]:
    """(text, label) spans over the original, in order: "kept" (reproduced), "changed" (replaced
    by the "added" text that follows it), "lost" (missing), "added" (produced, not in the original)."""
    a_ids, a_pieces = token_pieces(tokenizer, original)
    b_ids, b_pieces = token_pieces(tokenizer, reconstructed)
    spans: list[tuple[str, str]] = []
    matcher = difflib.SequenceMatcher(a=a_ids, b=b_ids, autojunk=False)
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        original_text, new_text = "".join(a_pieces[a0:a1]), "".join(b_pieces[b0:b1])
        if op == "equal":
            spans.append((original_text, "kept"))
        elif op == "replace":
            spans += [(original_text, "changed"), (new_text, "added")]
        elif op == "delete":
            spans.append((original_text, "lost"))
        else:
            spans.append((new_text, "added"))
    return [(text, label) for text, label in spans if text]


# ---- UMAP's numba JIT, compiled in the background at start-up --------------------------------
def warm_umap_in_background() -> threading.Thread:
    """Compile UMAP's numba functions on a tiny input so that the first real map does not stall."""

    def run():
        project(np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32))

    thread = threading.Thread(target=run, name="umap-warm-up", daemon=True)
    thread.start()
    return thread
