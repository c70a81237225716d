"""Run and stage settings: small YAML files in configs/, read into dataclasses that validate
themselves. Run names follow the authors' pattern `{enc}-{dec}-cs{N}-{pooling}-w{W}-{mask}-{adapter}`.

A file holds one run, named by its file name, or a family of runs: a file with a `variants` key
(`{compression_ratio: [4, 8, 16], pooling: [concat, mean]}`) describes one run per combination of
those model settings, each named by its settings, the rest shared; `{variant}` in its publish_to is
the variant's short name (`cs4-mean-w1024-causal-mlp`). `run_names()` lists every run configs/ holds."""

from __future__ import annotations

import copy
import itertools
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from model.config import LCLMConfig

WEIGHT_KINDS = ("lora", "full")
PRECISIONS = ("auto", "bf16", "fp32")
GROUPS = ("adapter", "encoder", "decoder")
CONFIG_DIR = Path(__file__).parent / "configs"


def _span(value, name: str) -> tuple[int, int]:
    low, high = value
    if not 1 <= low <= high:
        raise ValueError(f"{name} must be [low, high] with 1 <= low <= high, got {value!r}")
    return int(low), int(high)


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1 or not self.target_modules:
            raise ValueError(f"invalid LoRA settings: {self}")


@dataclass
class InterleavedSettings:
    """Next-token sequences of `seq_tokens` raw tokens where compressed spans (about
    `memory_fraction` of the tokens, each `span_tokens` long) alternate with plain spans."""

    seq_tokens: int = 2048
    memory_fraction: float = 0.5
    span_tokens: tuple[int, int] = (128, 1024)

    def __post_init__(self) -> None:
        self.span_tokens = _span(self.span_tokens, "interleaved.span_tokens")
        if not 0 < self.memory_fraction < 1:
            raise ValueError("interleaved.memory_fraction must be in (0, 1)")
        if self.seq_tokens < 2 * self.span_tokens[0]:
            raise ValueError("interleaved.seq_tokens must hold at least two spans")


@dataclass
class ReconstructionSettings:
    """Compress a span of `span_tokens` tokens; the decoder repeats it verbatim."""

    span_tokens: tuple[int, int] = (64, 1024)

    def __post_init__(self) -> None:
        self.span_tokens = _span(self.span_tokens, "reconstruction.span_tokens")


@dataclass
class TaskSettings:
    """Stage-3 task data: synthetic tasks (weights per task name) and EXPAND transcripts."""

    context_tokens: tuple[int, int] = (256, 2048)
    tasks: dict[str, float] = field(default_factory=lambda: {
        "niah_single": 1.0, "niah_multikey": 1.0, "niah_multivalue": 1.0, "variable_tracking": 1.0,
        "kv_retrieval": 1.0, "sentence_qa": 1.0})
    expand_share: float = 0.25  # share of task examples that are EXPAND-agent rounds
    chunk_tokens: int = 512

    def __post_init__(self) -> None:
        from model.training.data.synthetic import TASKS

        self.context_tokens = _span(self.context_tokens, "task.context_tokens")
        unknown = set(self.tasks) - set(TASKS)
        if unknown or not self.tasks or min(self.tasks.values()) < 0 or sum(self.tasks.values()) <= 0:
            raise ValueError(f"task.tasks must weigh known tasks {sorted(TASKS)}, got {self.tasks}")
        if not 0 <= self.expand_share <= 1 or self.chunk_tokens < 1:
            raise ValueError("task.expand_share must be in [0, 1] and task.chunk_tokens positive")


@dataclass
class StageConfig:
    stage: int
    steps: int
    lr: dict[str, float]  # per parameter group (adapter, encoder, decoder); groups the stage freezes are ignored
    objectives: dict[str, float]  # objective name -> sampling weight
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        from model.training.examples import OBJECTIVES
        from model.training.stages import STAGES

        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {sorted(STAGES)}, got {self.stage}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.warmup_steps < 0:
            raise ValueError(f"stage {self.stage}: steps, batch_size and grad_accum must be positive")
        missing = [g for g in STAGES[self.stage].trains if self.lr.get(g, 0) <= 0]
        if missing:
            raise ValueError(f"stage {self.stage} trains {missing}: give each a positive lr")
        unknown = set(self.lr) - set(GROUPS)
        if unknown:
            raise ValueError(f"stage {self.stage}: unknown parameter groups {sorted(unknown)}; known: {GROUPS}")
        bad = set(self.objectives) - set(OBJECTIVES)
        if bad or not self.objectives or min(self.objectives.values()) < 0 or sum(self.objectives.values()) <= 0:
            raise ValueError(f"stage {self.stage}: objectives must weigh {sorted(OBJECTIVES)}, got {self.objectives}")

    @property
    def name(self) -> str:
        from model.training.stages import STAGES

        return f"stage{self.stage}-{STAGES[self.stage].name}"


@dataclass
class RunConfig:
    encoder: str  # base model: a LOCAL_BASES name (the embedded SmolLM2), a directory or a hub id
    decoder: str
    encoder_short: str  # short names for the run name, e.g. "0.6b" and "4b"
    decoder_short: str
    lclm: LCLMConfig
    stages: list[StageConfig]
    corpus: str = "data/corpus.safetensors.xz"
    encoder_weights: str = "lora"  # "lora" or "full": how each component is trained and saved
    decoder_weights: str = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    decoder_lora: LoraSettings | None = None  # the decoder's LoRA where it differs from `lora`
    interleaved: InterleavedSettings = field(default_factory=InterleavedSettings)
    reconstruction: ReconstructionSettings = field(default_factory=ReconstructionSettings)
    task: TaskSettings = field(default_factory=TaskSettings)
    precision: str = "auto"  # auto: bf16 on CUDA and on CPUs with fast bf16 matmul (model.precision), else fp32
    gradient_checkpointing: bool = True  # applied on CUDA only
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_batches: int = 4  # validation micro-batches per objective at the end of each stage
    save_dtype: str = "float32"  # dtype of the weights in final/ ("bfloat16" halves a LoRA checkpoint)
    seed: int = 0
    publish_to: str | None = None  # where `--publish` copies the final checkpoint

    def __post_init__(self) -> None:
        if self.encoder_weights not in WEIGHT_KINDS or self.decoder_weights not in WEIGHT_KINDS:
            raise ValueError(f"encoder_weights and decoder_weights must be one of {WEIGHT_KINDS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}")
        numbers = [s.stage for s in self.stages]
        if not numbers or numbers != sorted(set(numbers)):
            raise ValueError(f"stages must be listed once each, in order, got {numbers}")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise ValueError("save_dtype must be float32 or bfloat16")
        if self.eval_batches < 0:
            raise ValueError("eval_batches must be >= 0")
        if self.save_every < 1 or self.keep_checkpoints < 1 or self.log_every < 1:
            raise ValueError("save_every, keep_checkpoints and log_every must be positive")
        if self.interleaved.span_tokens[0] < self.lclm.compression_ratio:
            raise ValueError("interleaved.span_tokens must be at least one latent group long")

    @property
    def name(self) -> str:
        c = self.lclm
        return (f"{self.encoder_short}-{self.decoder_short}-cs{c.compression_ratio}-{c.pooling}"
                f"-w{c.encoder_window_size}-{c.encoder_mask_type}-{c.adapter_type}")

    # ---- files -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        data = dict(data)
        nested = {"lclm": LCLMConfig.from_dict, "lora": lambda d: LoraSettings(**d),
                  "decoder_lora": lambda d: LoraSettings(**d) if d is not None else None,
                  "interleaved": lambda d: InterleavedSettings(**d),
                  "reconstruction": lambda d: ReconstructionSettings(**d), "task": lambda d: TaskSettings(**d)}
        for key, make in nested.items():
            if key in data:
                data[key] = make(data[key])
        data["stages"] = [StageConfig(**s) for s in data.get("stages", [])]
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown run settings {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        """A run from a YAML file of one run, or by name: a file's name in configs/ or a variant of
        a family file there. A variant's name may also be given as a path to a .yaml file next to
        its family file (the path a file of its own would have)."""
        path = Path(path)
        for candidate in (path, CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):
            if candidate.is_file():
                data = _read_yaml(candidate)
                if FAMILY_KEY in data:
                    raise ValueError(f"{candidate} describes several runs; load one of them by name: "
                                     f"{', '.join(_family_runs(data))}")
                return cls.from_dict(data)
        directory = CONFIG_DIR if path.parent == Path(".") else path.parent
        name = path.name.removesuffix(".yaml")
        runs = run_settings(directory)
        if name not in runs:
            raise FileNotFoundError(f"no run config {str(path)!r}: not a file, nor a run in {directory} "
                                    f"(runs there: {', '.join(sorted(runs))})")
        return cls.from_dict(runs[name])

    def to_dict(self) -> dict:
        data = asdict(self)
        data["lclm"] = self.lclm.to_dict()
        return data

    def stage(self, number: int) -> StageConfig:
        return next(s for s in self.stages if s.stage == number)


# ---- the runs in a directory of configs ------------------------------------------------------
FAMILY_KEY = "variants"


def _read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def _family_runs(family: dict) -> dict[str, dict]:
    """Each variant of a family file, by run name: the shared settings with the variant's model
    settings in `lclm` and its short name for `{variant}` in publish_to."""
    variants = family[FAMILY_KEY]
    unknown = set(variants) - {f.name for f in fields(LCLMConfig)}
    if unknown or not variants:
        raise ValueError(f"{FAMILY_KEY} must list values of model settings (lclm keys), got {sorted(variants)}")
    shared = {k: v for k, v in family.items() if k != FAMILY_KEY}
    runs = {}
    for values in itertools.product(*variants.values()):
        run = copy.deepcopy(shared)
        run["lclm"] = {**shared.get("lclm", {}), **dict(zip(variants, values))}
        variant = LCLMConfig.from_dict(run["lclm"]).name
        if run.get("publish_to"):
            run["publish_to"] = run["publish_to"].replace("{variant}", variant)
        runs[f"{run['encoder_short']}-{run['decoder_short']}-{variant}"] = run
    return runs


def run_settings(directory: Path = CONFIG_DIR) -> dict[str, dict]:
    """The settings of every run the YAML files in `directory` hold, by run name: a one-run file
    under its file name, each variant of a family file under the variant's name."""
    runs = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        data = _read_yaml(path)
        found = _family_runs(data) if FAMILY_KEY in data else {path.stem: data}
        clash = set(found) & set(runs)
        if clash:
            raise ValueError(f"{path} names runs that another file in {directory} names too: {sorted(clash)}")
        runs.update(found)
    return runs


def run_names(directory: Path = CONFIG_DIR) -> list[str]:
    """Every run name that RunConfig.load finds in `directory`."""
    return sorted(run_settings(directory))
