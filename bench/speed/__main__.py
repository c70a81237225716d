"""Command line of the speed benchmark: `python -m bench.speed --help`."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

STARTED = time.perf_counter()

import torch  # noqa: E402

from bench.speed.methods import DEFAULT_METHODS, TIMED_METHODS, quiet_kvpress  # noqa: E402
from bench.speed.report import (  # noqa: E402
    dtype_comparison,
    dtype_table,
    machine,
    markdown_table,
    matmul_peaks,
    plots,
    results,
    slug,
    write_json,
)
from bench.speed.rigs import PAIRS, checkpoint_rig, random_pair_rig  # noqa: E402
from bench.speed.sweep import Plan, Sweep  # noqa: E402
from model.config import RATIOS  # noqa: E402
from model.precision import DTYPE_CHOICES, choose_dtype  # noqa: E402

K = 1024


@dataclass
class Preset:
    """Defaults of one kind of run; every field can be overridden on the command line."""

    rig: str  # "checkpoint" (the app's loader) or "random" (a random Qwen3 pair)
    device: str
    lengths: list[int]
    runs: int
    budget_min: float
    max_repeat_s: float
    max_length: dict[str, int] = field(default_factory=dict)
    sweep_max_length: dict[str, int] = field(default_factory=dict)
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))


PRESETS = {
    # The embedded model on a CPU. The decoder reads 8,192 positions, so full context stops at 7.5k.
    # Presses cost a full prefill and more (KVzip replays the context): fewer lengths, fewer ratios.
    "cpu": Preset(rig="checkpoint", device="cpu", lengths=[1 * K, 2 * K, 4 * K, 7680], runs=3, budget_min=14,
                  max_repeat_s=90, max_length={"snapkv": 4 * K, "kvzip": 2 * K},
                  sweep_max_length={"snapkv": 2 * K, "kvzip": 1 * K}),
    # The embedded model past the decoder's window: each length the longest that one ratio reads
    # (7,680 latents and the prompt within 8,192 positions: 1:4 at 30k, 1:8 at 60k, 1:16 at 120k)
    # and 128k, which none does; full context to its window, cold and cached latents.
    "cpu-long": Preset(rig="checkpoint", device="cpu", lengths=[7680 * 2**i for i in range(5)] + [128 * K], runs=3,
                       budget_min=40, max_repeat_s=120, methods=["full", "lclm", "lclm_cached"]),
    # The paper's pair with random weights on one GPU, in one 10-minute run: full context as far as
    # it fits and time allows, presses to 64k / 32k, ratios 1:4 and 1:8 to 128k, 1:16 to 1M.
    "gpu": Preset(rig="random", device="cuda", lengths=[4 * K * 2**i for i in range(9)], runs=3, budget_min=8.5,
                  max_repeat_s=20, max_length={"full": 256 * K, "snapkv": 64 * K, "kvzip": 32 * K},
                  sweep_max_length={"lclm": 128 * K, "lclm_cached": 128 * K, "snapkv": 32 * K, "kvzip": 16 * K}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: gpu where CUDA is present, else cpu")
    parser.add_argument("--checkpoint", help="checkpoint directory for the cpu preset (default: the embedded model)")
    parser.add_argument("--pair", choices=sorted(PAIRS), default="paper", help="random pair shape for the gpu preset")
    parser.add_argument("--device", help="override the preset's device")
    parser.add_argument("--lengths", type=int, nargs="+", help="document lengths in tokens")
    parser.add_argument("--ratios", type=int, nargs="+", default=list(RATIOS))
    parser.add_argument("--methods", nargs="+", choices=list(TIMED_METHODS),
                        help="default: the preset's (all but three presses; cpu-long: full context and the LCLM)")
    parser.add_argument("--runs", type=int, help="timed runs per point (median), after one warm-up per method")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens decoded per request")
    parser.add_argument("--budget-min", type=float, help="stop starting new runs after this many minutes")
    parser.add_argument("--time-budget-s", type=float,
                        help="the same in seconds, counted from the start of the process (rig building included); "
                             "a run predicted to end past it is left for a resumed call")
    parser.add_argument("--resume", action="store_true",
                        help="take over the points measured in the results file already at --out-dir/--name (same "
                             "rig and machine) and run only the rest")
    parser.add_argument("--max-repeat-s", type=float, help="do not repeat a point whose first run took longer")
    parser.add_argument("--no-caps", action="store_true", help="drop the preset's per-method length caps")
    parser.add_argument("--memory-limit-gib", type=float,
                        help="treat the device as this large (on CUDA also enforced), e.g. 80 on a bigger GPU")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's); 1 is steadier where other jobs share the cores")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPE_CHOICES, default=["auto"],
                        help="one or more dtypes, measured in one run with their runs interleaved (e.g. float32 "
                        "bfloat16); auto: bfloat16 where the device computes it fast (model.precision)")
    parser.add_argument("--encoder-batch-tokens", type=int, help="encoder tokens per batch (the memory budget)")
    parser.add_argument("--out-dir", default="bench/results")
    parser.add_argument("--name", help="file stem under --out-dir (default: speed-<machine>)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--plots-from", help="measure nothing: write the Markdown table and plots of this JSON")
    return parser.parse_args(argv)


def build_rig(args, preset: Preset, dtype: torch.dtype):
    device = torch.device(args.device or preset.device)
    if preset.rig == "checkpoint":
        return checkpoint_rig(args.checkpoint, args.ratios, device=device, dtype=dtype)
    return random_pair_rig(args.pair, args.ratios, device=device, dtype=dtype)


def limit_memory(device: torch.device, limit_gib: float | None) -> int | None:
    if limit_gib is None:
        return None
    limit = int(limit_gib * 2**30)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), device)
    return limit


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.plots_from:  # a results file measured elsewhere: its Markdown and plots here
        data = json.loads(Path(args.plots_from).read_text())
        stem = Path(args.plots_from).with_suffix("")
        stem.with_suffix(".md").write_text(markdown_table(data))
        print("wrote " + ", ".join(str(p) for p in [stem.with_suffix(".md"), *plots(data, stem)]))
        return data
    # the budget counts from the process's start when run as a command (torch's import included),
    # from this call when main() is called in a process that has done other work (the tests)
    started = STARTED if __name__ == "__main__" else time.perf_counter()
    preset = PRESETS[args.preset or ("gpu" if torch.cuda.is_available() else "cpu")]
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_kvpress()
    device = torch.device(args.device or preset.device)
    choices = {}
    for requested in args.dtypes:  # one rig per distinct dtype
        choice = choose_dtype(requested, device)
        choices.setdefault(choice.name, choice)
    rigs = {}
    for name, choice in choices.items():
        print(f"building the rig ({preset.rig}, {name}: {choice.reason}) ...", flush=True)
        rigs[name] = build_rig(args, preset, choice.dtype)
        if args.encoder_batch_tokens:
            for lclm in rigs[name].lclms.values():
                lclm.encoder.max_batch_tokens = args.encoder_batch_tokens
    rig = next(iter(rigs.values()))
    plan = Plan(
        lengths=args.lengths or preset.lengths, ratios=args.ratios, methods=args.methods or preset.methods,
        runs=args.runs or preset.runs, new_tokens=args.new_tokens,
        budget_s=args.time_budget_s if args.time_budget_s is not None else
        60 * (args.budget_min if args.budget_min is not None else preset.budget_min),
        max_repeat_s=args.max_repeat_s if args.max_repeat_s is not None else preset.max_repeat_s,
        max_length={} if args.no_caps else preset.max_length,
        sweep_max_length={} if args.no_caps else preset.sweep_max_length,
        memory_limit_bytes=limit_memory(rig.device, args.memory_limit_gib),
    )
    info = machine(rig.device)
    info["matmul_peak"] = matmul_peaks(rig.device)  # the probe, in this run, before the sweep
    base = Path(args.out_dir) / (args.name or f"speed-{slug(info)}")
    stems = {name: base if len(rigs) == 1 else base.with_name(f"{base.name}-{name}") for name in rigs}
    command = "python -m bench.speed " + shlex.join(sys.argv[1:] if argv is None else argv)
    for name, each in rigs.items():
        print(f"{info['name']}: {each.name}, {name}, {each.weights_bytes() / 2**30:.2f} GiB of weights", flush=True)

    def saver(name: str):
        def save(sweep: Sweep) -> dict:
            data = results(sweep.rig, plan, sweep.points, {**info, **choices[name].to_dict()},
                           time.perf_counter() - started, command)
            write_json(data, stems[name].with_suffix(".json"))
            return data
        return save

    sweeps = {name: Sweep(each, plan, started=started, on_progress=saver(name)) for name, each in rigs.items()}
    if args.resume:
        for name, sweep in sweeps.items():
            path = stems[name].with_suffix(".json")
            if not path.is_file():
                continue
            earlier = json.loads(path.read_text())
            if (earlier["rig"]["name"], earlier["rig"]["dtype"], earlier["machine"]["name"]) != \
                    (sweep.rig.describe()["name"], sweep.rig.describe()["dtype"], info["name"]):
                raise SystemExit(f"error: {path} was measured on another rig or machine")
            print(f"resuming: {sweep.restore(earlier['records'])} points taken over from {path}")
    for sweep in sweeps.values():
        sweep.warm_up()
    for rep in range(plan.runs):  # the dtypes' runs interleaved: a noisy machine disturbs them alike
        for sweep in sweeps.values():
            sweep.run_round(rep)
    written, all_data = [], {}
    plots_possible = importlib.util.find_spec("matplotlib") is not None
    if not args.no_plots and not plots_possible:
        print("matplotlib is not installed: no plots (draw them later with --plots-from the JSON)")
    for name, sweep in sweeps.items():
        data = all_data[name] = saver(name)(sweep)
        stem = stems[name]
        stem.with_suffix(".md").write_text(markdown_table(data))
        written += [stem.with_suffix(".json"), stem.with_suffix(".md")]
        if not args.no_plots and plots_possible:
            written += plots(data, stem)
        print(markdown_table(data))
    if len(all_data) > 1:
        comparison = dtype_comparison(all_data)
        write_json(comparison, base.with_name(f"{base.name}-dtypes.json"))
        base.with_name(f"{base.name}-dtypes.md").write_text(dtype_table(comparison))
        written += [base.with_name(f"{base.name}-dtypes.json"), base.with_name(f"{base.name}-dtypes.md")]
        print(dtype_table(comparison))
    print("wrote " + ", ".join(str(p) for p in written), flush=True)
    return all_data if len(all_data) > 1 else next(iter(all_data.values()))


if __name__ == "__main__":
    main()
