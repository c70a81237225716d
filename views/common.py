"""What every tab shares: the controls that pick the model variant, turning the services'
errors into one-line messages in the page, and progress callbacks onto gr.Progress."""

from __future__ import annotations

import functools
import html
import inspect
from dataclasses import dataclass

import gradio as gr

from model.errors import UserError

MODEL_SLOT = "model"  # concurrency id of every event that runs a model: one at a time, the rest queue
OUT_OF_MEMORY = "out of memory; use a higher compression ratio or a shorter document"


@dataclass
class Shared:
    """Components that several tabs read: the per-session document id and the model choice."""

    document: gr.State  # sha256 of the loaded document, or None: the only per-session state
    family: gr.Dropdown
    ratio: gr.Radio
    pooling: gr.Radio

    @property
    def model_inputs(self) -> list:
        return [self.family, self.ratio, self.pooling]


def message(err: BaseException) -> str | None:
    """The one-sentence message for an error a user can cause, or None for a bug."""
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, MemoryError) or "out of memory" in str(err).lower():
        return OUT_OF_MEMORY
    return None


def user_errors(fn):
    """Wrap an event handler (function or generator) so user errors show as gr.Error."""

    def reraise(err: Exception):
        text = message(err)
        if text is None:
            raise err
        raise gr.Error(html.escape(text, quote=False), print_exception=False) from None  # the modal renders HTML

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (UserError, MemoryError, RuntimeError) as err:
                reraise(err)
        return generator

    @functools.wraps(fn)
    def function(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, MemoryError, RuntimeError) as err:
            reraise(err)
    return function


def progress_callback(progress: gr.Progress, unit: str = "steps"):
    """A services-style progress function, (stage, done, total), drawing on gr.Progress."""

    def update(stage: str, done: int, total: int) -> None:
        if total:
            progress((done, total), desc=stage, unit=unit)
        else:
            progress(None, desc=stage)

    return update
