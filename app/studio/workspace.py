"""The studio as the UI sees it: one process-wide `Workspace` over the models, the latent
cache, the documents and this process's run history. Each public method serves one UI
event (and API endpoint); it takes plain values (a document id, a model variant) and
returns plain data or figures, so the views only lay out widgets and call these."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from app.engine.answer import Answer
from app.engine.lru import BoundedLRU
from app.engine.measure import MiB
from app.engine.methods import LATENT_METHODS, METHODS
from app.engine.models import ProgressFn, validate_choice
from app.engine.service import AskRequest, Studio, chunks_shown
from app.studio import figures, latent_analysis
from app.studio.catalog import Catalog, Variant
from app.studio.documents import Document, DocumentStore, Layout, layout
from app.studio.history import RunHistory, run_row, to_csv, to_json
from app.studio.latent_analysis import latent_set, latent_statistics, project_sets, source_token_set, token_diff
from app.studio.serving import UPLOAD_DIR_ENV, discard_upload
from model.errors import UserError

log = logging.getLogger(__name__)
SWEEP_QUESTION = "What is this document about?"
SWEEP_MIN_TOKENS = 32


@dataclass
class MethodRun:
    """One method's answer as it streams, with its live readout."""

    name: str  # as the page shows it
    method: str  # its name in app.engine.methods.METHODS
    status: str = "waiting"  # waiting, running, done, or an error / unavailable message
    text: str = ""
    started: float = 0.0
    live_ttft_ms: float | None = None
    tokens: int = 0
    answer: Answer | None = None
    variant: Variant | None = None  # the variant it answers with (None: the request's)

    def readout(self) -> dict:
        """The row shown live: the measured numbers once done (rounded for people; the results
        JSON keeps full precision), wall-clock estimates while streaming. Memory is the peak above
        what the process held when the request started (docs/architecture.md, measurements)."""
        if self.answer is not None:
            m, expand = self.answer.measurement, self.answer.expand
            return {"method": self.name, "status": self.status, "TTFT ms": round(m.ttft_ms, 1),
                    "answer after ms": round(expand.answer_ttft_ms if expand else m.ttft_ms, 1),
                    "compress ms": round(m.compress_ms, 1), "prefill ms": round(m.prefill_ms, 1),
                    "tokens/s": round(m.tokens_per_s, 1), "tokens": m.new_tokens,
                    "peak above start MiB": round(m.peak_mem_above_weights_bytes / MiB, 1),
                    "KV cache MiB": round(m.kv_cache_bytes / MiB, 2), "positions": m.positions}
        elapsed = (time.perf_counter() - self.started) if self.started else 0.0
        rate = None
        if self.live_ttft_ms is not None and self.tokens > 1 and elapsed * 1000 > self.live_ttft_ms:
            rate = round((self.tokens - 1) / (elapsed - self.live_ttft_ms / 1000), 1)
        return {"method": self.name, "status": self.status,
                "TTFT ms": round(self.live_ttft_ms, 1) if self.live_ttft_ms is not None else None,
                "answer after ms": None, "compress ms": None, "prefill ms": None, "tokens/s": rate,
                "tokens": self.tokens, "peak above start MiB": None, "KV cache MiB": None, "positions": None}


@dataclass
class AskState:
    """Everything the Ask tab shows, after every streamed event."""

    methods: list[MethodRun]
    rounds: list[dict] = field(default_factory=list)
    expanded: dict[int, int] = field(default_factory=dict)  # chunk index -> EXPAND round that read it

    def readouts(self) -> list[dict]:
        return [m.readout() for m in self.methods]

    def results(self) -> dict[str, dict]:
        """Each finished answer as JSON, by the name the page gives its method."""
        return {m.name: m.answer.to_json() for m in self.methods if m.answer is not None}


@dataclass
class LatentMap:
    figure: object  # plotly Figure
    stats_figure: object
    summary: dict


class Workspace:
    """Process-wide: one per app. Sessions hold only ids (a document's sha256, the session hash)."""

    def __init__(self, studio: Studio, catalog: Catalog):
        self.studio = studio
        self.catalog = catalog
        self.documents = DocumentStore()
        self.history = RunHistory()
        self._reconstructions: BoundedLRU[tuple, dict] = BoundedLRU(32)
        # inside the studio's private upload directory (removed with it), else a temporary directory
        self._export_dir = Path(tempfile.mkdtemp(prefix="lclm-studio-exports-", dir=os.environ.get(UPLOAD_DIR_ENV)))

    # ---- models ----------------------------------------------------------------------
    def variant(self, family: str | None, ratio: int | str | None, pooling: str | None) -> Variant:
        """The catalog's variant for these choices (the default for missing ones)."""
        default = self.catalog.default
        if isinstance(ratio, str) and ratio.strip().isdigit():
            ratio = int(ratio)
        ratio, pooling = ratio or default.ratio, pooling or default.pooling
        validate_choice(ratio, pooling)  # API calls can send anything, whatever the page offers
        return self.catalog.find(family or default.family, ratio, pooling)

    def model(self, variant: Variant, progress: ProgressFn | None = None):
        return self.studio.model(variant.spec, variant.ratio, variant.pooling, progress)

    # ---- document --------------------------------------------------------------------
    def load_document(self, text: str | None, path: str | None, variant: Variant) -> tuple[Document, Layout]:
        """Store pasted text or an uploaded file (deleted once read); its layout under `variant`."""
        if path and not Path(path).exists():  # an upload read (and deleted) before, e.g. refused
            raise UserError(f"{Path(path).name} was already read and removed; upload the file again")
        try:
            document = self.documents.load(text, path)
        finally:
            if path:
                discard_upload(path)
        return document, self.layout(document.sha256, variant)

    def layout(self, doc_id: str | None, variant: Variant) -> Layout:
        return layout(self.studio, self.model(variant), self.documents.get(doc_id).text)

    # ---- compress --------------------------------------------------------------------
    def compress(self, doc_id: str | None, variant: Variant, progress: ProgressFn | None = None) -> dict:
        text = self.documents.get(doc_id).text
        compressed = self.studio.compress(text, variant.ratio, variant.pooling, variant.spec, progress=progress)
        return {**compressed.result.to_dict(), "variant": variant.label}

    # ---- latents ---------------------------------------------------------------------
    def latent_map(self, doc_id: str | None, variant: Variant, other_ratios: list[int] = (),
                   show_source_tokens: bool = False, progress: ProgressFn | None = None,
                   colour_by: str = "position") -> LatentMap:
        """UMAP of the latents (and of other ratios' latents and the source tokens' decoder
        embeddings, in one map), plus norms and neighbour similarity along the document."""
        text = self.documents.get(doc_id).text
        variants, notes = [variant], []
        for ratio in sorted({int(r) for r in other_ratios} - {variant.ratio}):
            sibling = self.catalog.sibling(variant, ratio)
            if sibling is None:
                notes.append(f"1:{ratio} left out: {variant.family} does not offer it")
            else:
                variants.append(sibling)
        sets = []
        for number, v in enumerate(variants):
            if progress:
                progress(f"compressing at 1:{v.ratio}", number, len(variants))
            compressed = self.studio.compress(text, v.ratio, v.pooling, v.spec)
            chunk_starts = [c.start_char for c in self.studio.store.chunks(compressed.model, text)]
            points = latent_set(f"latents {v.label}", compressed.latents,
                                compressed.model.latent_spans(len(compressed.document)), compressed.document,
                                chunk_starts)
            if sets and points.vectors.shape[1] != sets[0].vectors.shape[1]:
                notes.append(f"{v.label} left out: its decoder width differs")
                continue
            sets.append(points)
        stats = [(points, latent_statistics(torch.from_numpy(points.vectors))) for points in sets]  # every latent
        drawn = [latent_analysis.subsample(points) for points in sets]  # a long document's, evenly subsampled
        subsampled = [(points, shown) for points, shown in zip(sets, drawn) if len(shown.texts) < len(points.texts)]
        notes += [f"{points.name}: {len(shown.texts):,} of {len(points.texts):,} drawn, evenly along the document "
                  "(the curves below use them all)" for points, shown in subsampled]
        sets = drawn
        if show_source_tokens:
            sets.append(source_token_set(self.model(variant), text))
        if progress:
            progress("projecting (UMAP)", len(variants), len(variants))
        projection = project_sets(sets)
        counts = {points.name: len(points.vectors) for points in sets}
        title = f"{projection.method} of " + ", ".join(f"{n:,} {name}" for name, n in counts.items())
        if subsampled:
            title += " (subsampled)"
        classes = {points.name: dict(Counter(points.classes)) for points in sets}
        return LatentMap(figures.latent_map_figure(projection, title, colour_by), figures.latent_stats_figure(stats),
                         {"method": projection.method, "points": counts, "notes": notes, "colour_by": colour_by,
                          "content": classes})

    # ---- reconstruction ------------------------------------------------------------------
    def reconstruct(self, doc_id: str | None, variant: Variant, max_chunks: int | None = None,
                    progress: ProgressFn | None = None, chunk_tokens: int | None = None, chunk: int = 1) -> dict:
        """The decoder's reconstruction of the page of `max_chunks` chunks (None: all) that holds
        chunk number `chunk` (see Studio.reconstruct), kept in memory; chunks of `chunk_tokens`
        (None: the span length the variant was trained on). A long document is read a page at a
        time: choosing a chunk on another page reconstructs that page."""
        document = self.documents.get(doc_id)
        model = self.model(variant)
        chunk_tokens = self.studio.reconstruction_chunk_tokens(model, chunk_tokens)
        self.studio.tokenize(model, document.text)  # the document's limits first
        total = len(self.studio.store.chunks(model, document.text, chunk_tokens))
        per_page = min(total, max_chunks or total)
        first = (min(max(chunk, 1), total) - 1) // per_page * per_page + 1
        key = (document.sha256, model.checkpoint_id, chunk_tokens, first, per_page)
        return self._reconstructions.setdefault(key, lambda: {
            **self.studio.reconstruct(document.text, variant.ratio, variant.pooling, variant.spec, max_chunks=per_page,
                                      progress=progress, chunk_tokens=chunk_tokens, first_chunk=first),
            "variant": variant.label})

    def chunk_diff(self, reconstruction: dict, variant: Variant, chunk: int) -> tuple[str, list[tuple[str, str]]]:
        """(fidelity strip HTML with `chunk` selected, token diff of that chunk)."""
        chunks = reconstruction["chunks"]
        chosen = next((c for c in chunks if c["index"] == chunk), chunks[0] if chunks else None)
        shown = chunks_shown(reconstruction) or f"{len(chunks)} chunks"
        caption = f"{variant.label}: token accuracy {reconstruction['token_accuracy']:.1%} over {shown}"
        strip = figures.fidelity_strip(chunks, chosen["index"] if chosen else None, caption)
        if chosen is None:
            return strip, []
        tokenizer = self.model(variant).decoder_tokenizer
        return strip, token_diff(tokenizer, chosen["original"], chosen["reconstructed"])

    # ---- ask ---------------------------------------------------------------------------
    def ask(self, session: str, doc_id: str | None, question: str, variant: Variant, method: str = "lclm",
            baselines: list[str] = (), max_new_tokens: int | None = None,
            prompt_profile: str | None = None, other_ratios: Sequence[int] = ()) -> Iterator[AskState]:
        """Stream the answer of `method` (a method that reads latents: LCLM, LCLM + EXPAND, ...)
        from `variant`, then the same method's at each of `other_ratios` (that ratio's best trained
        variant, as comparisons pick it), then each chosen baseline's. `prompt_profile`: a name in
        model.prompts.PROMPT_PROFILES; None: the checkpoint's default."""
        if method not in LATENT_METHODS:
            raise UserError(f"answer from the latents with one of {', '.join(LATENT_METHODS)}, got {method!r}")
        asked = AskRequest(self.documents.get(doc_id).text, question, method, variant.ratio, variant.pooling,
                           variant.spec, max_new_tokens, prompt_profile=prompt_profile)  # checked here, at once
        comparisons = [name for name, m in METHODS.items() if not m.reads_latents]
        unknown = [b for b in baselines if b not in comparisons]
        if unknown:
            raise UserError(f"unknown comparison {unknown[0]!r}; choose from {', '.join(comparisons)}")
        latent_method = METHODS[method]
        main = MethodRun(latent_method.run_name(variant.label), method, variant=variant)
        siblings = [self.catalog.sibling(variant, int(r))
                    for r in sorted({int(r) for r in other_ratios} - {variant.ratio})]
        others = [MethodRun(latent_method.run_name(v.label), method, variant=v) for v in siblings if v is not None]
        state = AskState([main, *others] + [MethodRun(METHODS[name].label, name, variant=variant)
                                            for name in baselines])

        def stream(run: MethodRun, events) -> Iterator[AskState]:
            run.status, run.started = "running", time.perf_counter()
            for event in events:
                if event.kind == "token":
                    if run.live_ttft_ms is None:
                        run.live_ttft_ms = (time.perf_counter() - run.started) * 1000
                    run.tokens += 1
                    run.text += event.text
                elif event.kind == "round":
                    if run is main:  # the transcript and the lit chunks are the chosen variant's
                        state.rounds.append(event.round)
                        for index in event.round["expanded"]:
                            state.expanded.setdefault(index, event.round["number"])
                    run.text = ""  # the next round's reply streams afresh
                else:
                    answer = run.answer = event.answer
                    run.text = answer.text
                    if answer.empty:  # an empty answer says so, rather than an empty box
                        run.text = "(" + (answer.warnings or ["the answer is empty"])[-1] + ")"
                    run.status = "; ".join(["done", *answer.warnings])
                    self.history.add(session, run_row(answer, run.name))
                yield state

        yield state
        yield from stream(main, self.studio.ask(asked))
        for run in state.methods[1:]:
            v = run.variant
            try:
                yield from stream(run, self.studio.ask(replace(asked, method=run.method, ratio=v.ratio,
                                                               pooling=v.pooling, checkpoint=v.spec)))
            except Exception as err:  # a comparison that fails here says so; the answers so far stay
                if not isinstance(err, UserError):
                    log.exception("%s failed", run.name)
                run.status = run.text = f"error: {err}"
                yield state

    # ---- metrics ------------------------------------------------------------------------
    def metrics(self, session: str) -> tuple[list[dict], object]:
        """This session's runs and the chart of its last sweep."""
        return self.history.rows(session), figures.sweep_figure(self.history.sweep(session))

    def export(self, session: str, fmt: str) -> Path:
        """This session's runs (and sweep) as a CSV or JSON file in a temporary directory."""
        if fmt not in ("csv", "json"):
            raise UserError(f"export format must be csv or json, got {fmt!r}")
        rows = self.history.rows(session)
        data = to_csv(rows) if fmt == "csv" else to_json(rows, self.history.sweep(session))
        path = self._export_dir / f"lclm-runs-{(session or 'default')[:12]}.{fmt}"
        path.write_text(data, encoding="utf-8")
        return path

    def sweep(self, session: str, doc_id: str | None, variant: Variant, points: int = 5,
              progress: ProgressFn | None = None) -> list[dict]:
        """TTFT and peak memory of LCLM (cold: no latent cache) and full context on the first
        L tokens of the current document, for several L; kept as this session's sweep."""
        text = self.documents.get(doc_id).text
        model = self.model(variant)
        document = self.studio.tokenize(model, text)
        lengths = sweep_lengths(len(document), points)
        methods = (("lclm", f"lclm {variant.label}"), ("full", "full context"))
        rows, total, done = [], len(lengths) * len(methods), 0
        for length in lengths:
            prefix = document.text_of(0, length)
            for mode, name in methods:
                if progress:
                    progress(f"{name} at {length} tokens", done, total)
                rows.append(sweep_point(self.studio, prefix, mode, name, variant, length))
                done += 1
        if progress:
            progress("sweep done", total, total)
        self.history.set_sweep(session, rows)
        return rows


def sweep_point(studio: Studio, text: str, mode: str, name: str, variant: Variant, length: int) -> dict:
    """One method's TTFT and memory on `text` (one new token, no latent cache); a length the
    method cannot read (e.g. past the decoder's positions) is kept with its reason."""
    answer = None
    try:
        for event in studio.ask(AskRequest(text, SWEEP_QUESTION, mode, variant.ratio, variant.pooling,
                                           variant.spec, max_new_tokens=1, use_cache=False)):
            answer = event.answer or answer
    except UserError as err:
        return {"method": name, "tokens": length, "error": str(err)}
    m = answer.measurement
    return {"method": name, "tokens": answer.tokens, "ttft_ms": m.ttft_ms, "compress_ms": m.compress_ms,
            "prefill_ms": m.prefill_ms, "positions": m.positions, "kv_cache_bytes": m.kv_cache_bytes,
            "peak_mem_bytes": m.peak_mem_bytes, "peak_mem_above_weights_bytes": m.peak_mem_above_weights_bytes}


def sweep_lengths(tokens: int, points: int = 5) -> list[int]:
    """The whole document and halvings of it, shortest first, none below SWEEP_MIN_TOKENS
    (unless the document itself is shorter)."""
    lengths = {tokens}
    length = tokens
    for _ in range(points - 1):
        length //= 2
        if length >= SWEEP_MIN_TOKENS:
            lengths.add(length)
    return sorted(lengths)
