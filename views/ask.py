"""Ask tab: a question answered from the compressed context, streaming, by any registered method
that reads latents (LCLM; LCLM + EXPAND with the agent's transcript and the expanded chunks on
the document strip); optional side-by-side answers from the full-context decoder and a kvpress
baseline, with live readouts."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from app.engine.methods import LATENT_METHODS, METHODS, PRESS_METHODS
from app.engine.settings import PROFILES, RATIOS
from app.studio import figures
from views.common import MODEL_SLOT, Page, user_errors

NO_KVPRESS = "none"
CHECKPOINT_PROFILE = "checkpoint default"  # paper for published checkpoints, studio for the embedded model
FULL = "full"  # the full-context method (app.engine.methods)
TRANSCRIPT_COLUMNS = ["round", "prefilled", "action", "expanded", "ignored", "prompt tokens", "reply"]
READOUT_COLUMNS = ["method", "status", "TTFT ms", "answer after ms", "compress ms", "prefill ms", "tokens/s",
                   "tokens", "peak above start MiB", "KV cache MiB", "positions"]
STREAM_INTERVAL_S = 0.1  # at most this often a streamed update goes to the page
SERVED_SLOT, SERVED_CONCURRENCY = "served-answers", 32  # questions in flight at once when vLLM decodes


def kvpress_choices() -> list[tuple[str, str]]:
    """(label, method name) of every press in the registry."""
    return [(NO_KVPRESS, NO_KVPRESS)] + [(METHODS[name].label, name) for name in PRESS_METHODS]


def latent_method_choices() -> list[tuple[str, str]]:
    """(label, method name) of every registered method that answers from latents."""
    return [(METHODS[name].label, name) for name in LATENT_METHODS]


def readout_table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=READOUT_COLUMNS, dtype=object)


def build(page: Page) -> SimpleNamespace:
    max_new_tokens = page.workspace.studio.settings.max_new_tokens
    question = gr.Textbox(label="Question", lines=2, elem_id="question",
                          placeholder="Ask something the document answers")
    with gr.Row():
        latent_method = gr.Radio(latent_method_choices(), value="lclm", label="Answer from the latents with",
                                 info="LCLM + EXPAND lets the model read chunks in full", elem_id="latent-method")
        full = gr.Checkbox(False, label="Also answer from the full context", elem_id="compare-full")
        kvpress = gr.Dropdown(kvpress_choices(), value=NO_KVPRESS, label="Also answer with a KV-cache press",
                              elem_id="compare-kvpress")
        new_tokens = gr.Number(max_new_tokens, precision=0, minimum=1, maximum=4096,
                               label="Max new tokens (per EXPAND round)", elem_id="max-new-tokens")
        profile = gr.Dropdown([CHECKPOINT_PROFILE, *PROFILES], value=CHECKPOINT_PROFILE, label="Prompt profile",
                              info="paper: the authors' layout; studio: the studio's short prompts",
                              elem_id="prompt-profile")
    other_ratios = gr.CheckboxGroup([(f"1:{r}", r) for r in RATIOS], value=[], elem_id="ask-other-ratios",
                                    label="Also answer at these ratios (each ratio's best trained variant)")
    run = gr.Button("Ask", variant="primary", elem_id="ask")
    with gr.Row():
        answers = [gr.Textbox(label=label, lines=6, interactive=False, elem_id=f"answer-{key}", visible=key == "lclm")
                   for key, label in (("lclm", "LCLM (the variant chosen on the Compress tab)"),
                                      ("full", "Full context"), ("kvpress", "kvpress"))]
    at_ratios = gr.Textbox(label="At other ratios", lines=6, interactive=False, elem_id="answer-ratios",
                           visible=False)
    ttft = gr.Markdown(elem_id="ttft")
    readout = gr.Dataframe(readout_table([]), label="Live readouts", interactive=False, elem_id="ask-readout")
    strip = gr.HTML(elem_id="ask-strip")
    transcript = gr.Dataframe(pd.DataFrame(columns=TRANSCRIPT_COLUMNS), label="EXPAND transcript", wrap=True,
                              interactive=False, column_widths=["7%", "10%", "9%", "10%", "22%", "9%", "33%"],
                              elem_id="transcript")
    with gr.Accordion("All numbers", open=False):
        results = gr.JSON(label="Results", elem_id="ask-results")
    return SimpleNamespace(question=question, latent_method=latent_method, full=full, kvpress=kvpress,
                           new_tokens=new_tokens, profile=profile, other_ratios=other_ratios, run=run, answers=answers,
                           at_ratios=at_ratios, ttft=ttft, readout=readout, strip=strip, transcript=transcript,
                           results=results)


def ttft_markdown(readouts: list[dict]) -> str:
    """One line per method: TTFT first, with its compress / prefill split once known. EXPAND's
    first token is its first directive's; the time to its answer's first token comes beside it."""
    lines = []
    for r in readouts:
        if r["TTFT ms"] is None:
            lines.append(f"**{r['method']}**: {r['status']}")
        elif r["prefill ms"] is None:
            lines.append(f"**{r['method']}**: TTFT **{r['TTFT ms']:,.1f} ms** (streaming)")
        else:
            answer_after = r["answer after ms"]
            first = (f"first directive **{r['TTFT ms']:,.1f} ms**, answer's first token **{answer_after:,.1f} ms**"
                     if answer_after is not None and answer_after > r["TTFT ms"]
                     else f"TTFT **{r['TTFT ms']:,.1f} ms**")
            lines.append(f"**{r['method']}**: {first} = compress {r['compress ms']:,.1f} + "
                         f"prefill {r['prefill ms']:,.1f} + first token and the rest; {r['tokens/s'] or 0:,.1f} "
                         f"tokens/s; peak {r['peak above start MiB']:,.1f} MiB above the start; KV cache "
                         f"{r['KV cache MiB']:,.2f} MiB; {r['positions']:,} positions")
            if r["status"] != "done":
                lines.append(f"&nbsp;&nbsp;⚠ {r['status'].removeprefix('done; ')}")
    return "  \n".join(lines)


def transcript_table(rounds: list[dict]) -> pd.DataFrame:
    rows = [[r["number"], r["forced"] or "", r["action"], ", ".join(map(str, r["expanded"])), "; ".join(r["ignored"]),
             r["prompt_tokens"], r["raw_output"]] for r in rounds]
    return pd.DataFrame(rows, columns=TRANSCRIPT_COLUMNS)


def throttled(states: Iterable, interval_s: float = STREAM_INTERVAL_S) -> Iterator:
    """Every state that comes `interval_s` after the last one passed on, and always the last."""
    last_sent, state, pending = 0.0, None, False
    for state in states:
        pending = True
        if time.perf_counter() - last_sent >= interval_s:
            last_sent, pending = time.perf_counter(), False
            yield state
    if pending:
        yield state


def bind(ui: SimpleNamespace, page: Page) -> None:
    """Asks; every other tab's live readout table is updated with this one's, and the tabs that
    follow answers (page.answer_events) run after each."""
    shared, workspace = page.shared, page.workspace
    live_readouts = page.offered("live", by_other_than=ui)

    @user_errors
    def ask(document: str | None, family: str, ratio: int, pooling: str, question: str, latent_method: str,
            full: bool, kvpress: str, max_new_tokens: float, profile: str | None, other_ratios: list[int] | None,
            request: gr.Request):
        variant = workspace.variant(family, ratio, pooling)
        cells = workspace.layout(document, variant).cells
        baselines = ([FULL] if full else []) + ([kvpress] if kvpress and kvpress != NO_KVPRESS else [])
        profile = None if not profile or profile == CHECKPOINT_PROFILE else profile
        states = workspace.ask(request.session_hash, document, question, variant, latent_method or "lclm", baselines,
                               int(max_new_tokens or 0) or None, prompt_profile=profile,
                               other_ratios=other_ratios or [])
        press = kvpress if kvpress and kvpress != NO_KVPRESS else None
        for state in throttled(states):
            lclms = [m for m in state.methods[1:] if m.method == state.methods[0].method]
            by_method = {m.method: m.text for m in state.methods[1:] if m not in lclms}
            rows = state.readouts()
            readout = readout_table(rows)
            yield (gr.Textbox(value=state.methods[0].text, label=state.methods[0].name),  # names who answers
                   gr.Textbox(value=by_method.get(FULL, ""), visible=bool(full)),  # only the boxes asked for
                   gr.Textbox(value=by_method.get(kvpress, ""), visible=press is not None,
                              label=METHODS[press].label if press else "kvpress"),
                   ttft_markdown(rows), readout, figures.document_strip(cells, state.expanded),
                   transcript_table(state.rounds), state.results(),
                   gr.Textbox(value="\n\n".join(f"{m.name}: {m.text}" for m in lclms), visible=bool(lclms)),
                   *[readout] * len(live_readouts))

    inputs = [shared.document, *shared.model_inputs, ui.question, ui.latent_method, ui.full, ui.kvpress, ui.new_tokens,
              ui.profile, ui.other_ratios]
    outputs = [*ui.answers, ui.ttft, ui.readout, ui.strip, ui.transcript, ui.results, ui.at_ratios, *live_readouts]
    # in-process decoding: one model event at a time; vLLM servers batch many users' questions
    served = workspace.studio.settings.decoder == "vllm"
    page.answer_events.append(ui.run.click(ask, inputs, outputs, api_name="ask",
                                           concurrency_id=SERVED_SLOT if served else MODEL_SLOT,
                                           concurrency_limit=SERVED_CONCURRENCY if served else 1))
