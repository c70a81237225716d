"""Shared fixtures: an offline environment for every test, and tiny random checkpoints
in the published layout (written once per session, cached by their settings)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from tests.tiny_models import write_tiny_checkpoint

_CHECKPOINT_DEFAULTS = {
    name: param.default
    for name, param in inspect.signature(write_tiny_checkpoint).parameters.items()
    if name != "directory"
}


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped where torch sees no CUDA device (`pytest -m cuda` on a GPU machine)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def offline_environment(monkeypatch, tmp_path_factory):
    """No test reaches a model hub or the user's data directory."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LCLM_STUDIO_HOME", str(tmp_path_factory.mktemp("lclm-home")))


@pytest.fixture(autouse=True)
def matmul_probe(monkeypatch):
    """`dtype auto` on a CPU is decided by its flags, or where they are unknown by model.precision's
    matmul probe. Every test sees a CPU of unknown flags and the same stubbed probe, one without
    fast bf16 (auto is float32 on every machine); a test calls the returned function(speedup) to
    see another CPU."""
    from model import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: None)

    def stub(speedup: float = 0.02) -> precision.MatmulProbe:
        probe = precision.MatmulProbe(float32_rate=1e11, bfloat16_rate=1e11 * speedup, threads=1)
        monkeypatch.setattr(precision, "cpu_matmul_probe", lambda: probe)
        return probe

    stub()
    return stub


@pytest.fixture
def no_unpickling(monkeypatch):
    """torch.load and pickle.load(s) fail the test if anything calls them."""
    import pickle

    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle file must never be loaded")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(tmp_path_factory):
    """function(**write_tiny_checkpoint kwargs) -> Path of a tiny checkpoint, written once per settings."""
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    cache: dict[tuple, Path] = {}

    def factory(**kwargs) -> Path:
        unknown = set(kwargs) - set(_CHECKPOINT_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown tiny checkpoint settings: {sorted(unknown)}")
        settings = {**_CHECKPOINT_DEFAULTS, **kwargs}
        key = tuple(sorted(settings.items()))
        if key not in cache:
            name = "-".join(f"{k}_{v}" for k, v in key)
            cache[key] = write_tiny_checkpoint(root / name, **settings)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoint_factory) -> Path:
    """qwen3, ratio 4, mean pooling, causal, window 16."""
    return tiny_checkpoint_factory(family="qwen3", ratio=4, pooling="mean", window=16)


@pytest.fixture(scope="session")
def tiny_lclm_factory(tiny_checkpoint_factory):
    """function(**checkpoint kwargs) -> LCLM loaded (on CPU) from the tiny checkpoint with those
    settings, cached per session: tests must not modify the returned model."""
    from model.loading import load_lclm

    cache: dict[Path, object] = {}

    def factory(**kwargs):
        path = tiny_checkpoint_factory(**kwargs)
        if path not in cache:
            cache[path] = load_lclm(str(path), device="cpu")
        return cache[path]

    return factory


@pytest.fixture
def out_of_memory(monkeypatch):
    """function(owner, name, call=1): `owner.name` raises torch.OutOfMemoryError on its `call`-th
    call, once, as the allocator would, and otherwise runs as before. Returns the list of calls
    made so far (one entry each), so a test can see that the failure happened."""
    import torch

    def inject(owner, name: str, call: int = 1) -> list[int]:
        original = getattr(owner, name)
        calls: list[int] = []

        def failing(*args, **kwargs):
            calls.append(len(calls) + 1)
            if len(calls) == call:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, failing)
        return calls

    return inject


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread on a shared machine; restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
