"""`dtype auto|float32|bfloat16`: what auto picks on each kind of device, decided by the CPU's
matmul probe (stubbed here for both outcomes, see conftest.matmul_probe), and why."""

import pytest
import torch

from model import precision
from model.precision import choose_dtype, fast_dtype


def test_auto_on_a_cpu_with_fast_bf16_picks_bfloat16_and_reports_the_probe(matmul_probe):
    matmul_probe(speedup=6.0)
    choice = choose_dtype("auto", "cpu")
    assert choice.dtype == torch.bfloat16 and fast_dtype("cpu") == torch.bfloat16
    report = choice.to_dict()
    assert report["dtype"] == "bfloat16" and report["dtype_requested"] == "auto"
    assert report["bf16_probe"]["bf16_speedup"] == 6.0 and report["bf16_probe"]["float32_gflops"] == 200.0
    assert "6.0x faster" in report["dtype_reason"]


def test_auto_on_a_cpu_without_fast_bf16_picks_float32_and_reports_the_probe(matmul_probe):
    matmul_probe(speedup=0.02)
    choice = choose_dtype("auto", "cpu")
    assert choice.dtype == torch.float32 and fast_dtype("cpu") == torch.float32
    assert choice.to_dict()["bf16_probe"]["bf16_speedup"] == 0.02 and "probe" in choice.reason


def test_a_speedup_just_below_the_threshold_keeps_float32(matmul_probe):
    matmul_probe(speedup=precision.MIN_SPEEDUP * 0.99)
    assert choose_dtype("auto", "cpu").dtype == torch.float32
    matmul_probe(speedup=precision.MIN_SPEEDUP)
    assert choose_dtype("auto", "cpu").dtype == torch.bfloat16


def test_auto_on_cuda_is_bfloat16_without_a_probe(monkeypatch):
    monkeypatch.setattr(precision, "cpu_matmul_probe", lambda: pytest.fail("CUDA must not run the CPU probe"))
    choice = choose_dtype("auto", "cuda")
    assert choice.dtype == torch.bfloat16 and choice.probe is None and "bf16_probe" not in choice.to_dict()


@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_an_explicit_dtype_is_kept_on_any_device(monkeypatch, name, dtype):
    monkeypatch.setattr(precision, "cpu_matmul_probe", lambda: pytest.fail("an explicit dtype needs no probe"))
    for device in ("cpu", "cuda"):
        choice = choose_dtype(name, device)
        assert choice.dtype == dtype and choice.to_dict() == {"dtype": name, "dtype_requested": name,
                                                              "dtype_reason": "asked for"}


def test_an_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="auto, float32, bfloat16"):
        choose_dtype("float16", "cpu")


def test_the_real_probe_measures_positive_rates():
    rate = precision.matmul_rate(torch.float32, repeats=1, shape=(8, 16, 8))
    assert rate > 0


@pytest.mark.parametrize("flags, dtype, why", [
    ({"avx2", "amx_bf16", "amx_tile"}, torch.bfloat16, "amx_bf16 in its flags"),
    ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16, "avx512_bf16 in its flags"),
    ({"avx2", "fma"}, torch.float32, "no bfloat16 matrix units"),
])
def test_the_cpus_flags_decide_before_any_timing(monkeypatch, flags, dtype, why):
    """Flags do not change with load: a known CPU is decided without the probe."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(precision, "cpu_matmul_probe", lambda: pytest.fail("known flags need no probe"))
    choice = choose_dtype("auto", "cpu")
    assert choice.dtype == dtype and why in choice.reason and choice.probe is None


REAL_CPU_FLAGS, REAL_PROBE = precision.cpu_flags, precision.cpu_matmul_probe  # before the fixtures stub them


def test_this_machines_flags_are_read():
    flags = REAL_CPU_FLAGS.__wrapped__()
    assert flags is None or len(flags) > 0


def test_the_probe_alternates_types_and_keeps_the_best_of_each(monkeypatch):
    rates = iter([1.0, 5.0, 3.0, 4.0, 2.0, 9.0])  # float32, bfloat16, float32, ...
    monkeypatch.setattr(precision, "matmul_rate", lambda dtype, repeats=8: next(rates))
    probe = REAL_PROBE.__wrapped__(rounds=3)
    assert (probe.float32_rate, probe.bfloat16_rate) == (3.0, 9.0)
