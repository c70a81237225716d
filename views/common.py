"""What every tab shares: the page object every tab's build and bind receive, the controls that
pick the model variant, turning the services' errors into one-line messages in the page, and
progress callbacks onto gr.Progress."""

from __future__ import annotations

import functools
import html
import inspect
from dataclasses import dataclass, field
from types import SimpleNamespace

import gradio as gr

from app.engine.memory import is_out_of_memory, release_memory
from model.errors import OUT_OF_MEMORY, UserError

MODEL_SLOT = "model"  # concurrency id of every event that runs a model: one at a time, the rest queue


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


@dataclass
class Page:
    """What every tab's `build(page)` and `bind(ui, page)` receive (views/studio.py calls them in
    the order of its TABS). A tab offers the others components by the names of its `ui`: every
    `strip` is a document strip (redrawn for each new document), every `live` a readout table
    (updated with the Ask tab's); an event that other tabs follow goes in `answer_events`."""

    workspace: object  # app.studio.workspace.Workspace
    demo: gr.Blocks
    shared: Shared | None = None  # set once every tab is built
    tabs: dict[str, gr.Tab] = field(default_factory=dict)  # tab id -> the tab itself
    uis: dict[str, SimpleNamespace] = field(default_factory=dict)  # tab id -> the components its build made
    answer_events: list = field(default_factory=list)  # the events after which an answer is in the history

    def offered(self, name: str, by_other_than: SimpleNamespace | None = None) -> list:
        """Every tab's component called `name` (e.g. "strip", "live"), in tab order."""
        return [getattr(ui, name) for ui in self.uis.values() if ui is not by_other_than and hasattr(ui, name)]


def user_errors(fn):
    """Wrap an event handler (function or generator) so user errors (out of memory included,
    which the services raise as model.errors.OutOfMemory) show as gr.Error."""

    def shown(err: Exception) -> gr.Error:
        """The page's message for a user error, or for running out of memory outside the services
        (e.g. a UMAP projection); any other exception is a bug and is raised as it is."""
        if isinstance(err, UserError):
            text = str(err)
        elif is_out_of_memory(err):
            release_memory()
            text = OUT_OF_MEMORY
        else:
            raise err
        return gr.Error(html.escape(text, quote=False), print_exception=False)  # the modal renders HTML

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (UserError, MemoryError, RuntimeError) as err:
                raise shown(err) from None
        return generator

    @functools.wraps(fn)
    def function(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, MemoryError, RuntimeError) as err:
            raise shown(err) from None
    return function


def progress_callback(progress: gr.Progress, unit: str = "steps"):
    """A services-style progress function, (stage, done, total), drawing on gr.Progress."""

    def update(stage: str, done: int, total: int) -> None:
        if total:
            progress((done, total), desc=stage, unit=unit)
        else:
            progress(None, desc=stage)

    return update
