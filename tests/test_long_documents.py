"""Long documents: compression window group by window group with each window's latents cached as
it finishes (so an interrupted compression resumes), equal to the whole-document compression; the
compress result's memory and cached-window readouts; the refusals past the decoder's positions
that say what fits (tiny checkpoints with windows of 16 tokens and a small position limit)."""

from __future__ import annotations

import pytest
import torch

from app.engine.methods import EXPANDED_HEADER_TOKENS, LATER_ROUNDS_MARGIN, MIN_EXPANDED, expand_layout
from app.engine.service import AskRequest, Studio
from app.engine.settings import Settings
from model.agent import Layout
from model.errors import UserError

DOC = " ".join(f"Entry {i} of the ledger reads {i * 37 % 1000} units." for i in range(60))  # ~ 40 windows of 16


@pytest.fixture
def make_studio(tmp_path, tiny_checkpoint_factory):
    checkpoint = str(tiny_checkpoint_factory(family="qwen3", ratio=4, window=16))

    def make(home: str = "home") -> Studio:
        studio = Studio(Settings(data_dir=tmp_path / home, device="cpu", chunk_tokens=32), checkpoint=checkpoint)
        studio.model().encoder.max_batch_tokens = 32  # two windows of 16 per forward (one of 1,024 on a CPU)
        return studio
    return make


def test_compression_by_window_groups_equals_the_whole_document(make_studio):
    model = make_studio().model()
    ids = model.tokenize_document(DOC).ids
    groups = model.window_groups(ids)
    assert len(groups) > 2 and sum(len(w) for g in groups for w in g) == len(ids)
    whole = model.compress(ids)  # [M, D]
    by_group = torch.cat([latents for g in groups for latents in model.compress_group(g)])
    assert torch.equal(whole, by_group) and whole.shape[0] == model.count_latents(len(ids))
    with torch.inference_mode():
        assert torch.allclose(whole, model.encode(ids), atol=1e-5)  # the training path, adapter over all at once


def test_an_interrupted_compression_resumes_from_its_finished_windows(make_studio, monkeypatch):
    reference = make_studio("fresh").compress(DOC)
    studio = make_studio()
    model = studio.model()
    real, calls = model.compress_group, []

    def dies_at_the_third_group(windows):
        calls.append(len(windows))
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the document
        return real(windows)
    monkeypatch.setattr(model, "compress_group", dies_at_the_third_group)
    with pytest.raises(KeyboardInterrupt):
        studio.compress(DOC)
    monkeypatch.setattr(model, "compress_group", real)
    resumed = studio.compress(DOC)
    assert (resumed.result.cached_windows == sum(calls[:2])
            and 0 < resumed.result.cached_windows < resumed.result.windows)
    assert not resumed.result.cached and torch.equal(resumed.latents, reference.latents)
    again = studio.compress(DOC).result
    assert again.cached and again.cached_windows == again.windows and again.compress_ms == 0.0
    to_json = again.to_dict()
    assert {"cached_windows", "windows", "peak_mem_above_weights_bytes"} <= set(to_json)
    assert reference.result.peak_mem_above_weights_bytes >= 0


def test_full_context_past_the_decoder_window_names_the_ratio_that_fits(make_studio):
    studio = make_studio()
    model = studio.model()
    model.decoder.config.max_position_embeddings = 600
    tokens = len(model.tokenize_document(DOC).ids)
    with pytest.raises(UserError, match=r"this decoder reads at most 600 \(an LCLM reads it: at 1:4 its") as err:
        list(studio.ask(AskRequest(DOC, "Which entry reads 37 units?", "full", max_new_tokens=4)))
    assert f"its {tokens:,} tokens become" in str(err.value)
    lclm = list(studio.ask(AskRequest(DOC, "Which entry reads 37 units?", "lclm", max_new_tokens=4)))[-1].result
    assert lclm["positions"] + 4 <= 600  # and the suggested path reads it


def test_latents_that_do_not_fit_say_the_largest_document_the_ratio_takes(make_studio):
    studio = make_studio()
    model = studio.model()
    model.decoder.config.max_position_embeddings = 120
    with pytest.raises(UserError, match=r"at 1:4 this decoder takes documents of up to about [\d,]+ tokens; a higher "
                                        r"ratio \(1:16\) takes longer ones"):
        list(studio.ask(AskRequest(DOC, "Which entry reads 37 units?", "lclm", max_new_tokens=4)))


def test_expand_shows_more_chunks_than_the_positions_can_label_in_sections(make_studio):
    studio = make_studio()
    model = studio.model()
    chunks = studio.store.chunks(model, DOC)
    latents, _, _ = studio.store.chunk_latents(model, chunks)
    profile = studio.prompt_profile(model)
    question, new_tokens = "Which entry reads 37 units?", 8

    def first_round_positions(per_section: int) -> int:
        _, contexts = Layout(per_section).show(latents)
        prompt = model.chat(profile.expand_round(contexts, {}, question, 4)) + profile.first_reply_prefix
        return len(model.decoder_tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def layout_at(limit: int) -> Layout:
        model.decoder.config.max_position_embeddings = limit
        return expand_layout(model, profile, question, latents, studio.settings.chunk_tokens, new_tokens, 4)

    labelled, one_section = first_round_positions(1), first_round_positions(len(chunks))
    assert one_section < labelled
    reserve = new_tokens + LATER_ROUNDS_MARGIN + MIN_EXPANDED * (studio.settings.chunk_tokens + EXPANDED_HEADER_TOKENS)
    roomy = layout_at(labelled + reserve)
    assert roomy.per_section == 1 and roomy.max_expanded >= MIN_EXPANDED
    limit = (labelled + one_section) // 2 + reserve
    tight = layout_at(limit)
    assert 1 < tight.per_section < len(chunks) and tight.max_expanded >= MIN_EXPANDED
    regions, sections = tight.show(latents)
    assert torch.equal(torch.cat(regions), torch.cat(latents))  # the same latents, in order, fewer labels
    assert [s.first for s in sections] == list(range(1, len(chunks) + 1, tight.per_section))
    with pytest.raises(UserError, match=rf"EXPAND cannot show this document's {len(chunks)} chunks"):
        layout_at(one_section + reserve - 1)

    model.decoder.config.max_position_embeddings = limit
    answer = list(studio.ask(AskRequest(DOC, question, "expand", max_new_tokens=new_tokens)))[-1].answer
    assert any(f"shown in sections of {tight.per_section}" in w for w in answer.warnings)
    assert answer.measurement.positions + new_tokens <= limit
    assert all(len(r["expanded"]) <= tight.max_expanded for r in answer.expand.rounds)
