"""The one owner of every `auto` and device rule.

A user config says what is wanted; some of it is `auto`, and some of it means different things on
different machines. `resolve` turns (config, machine facts, dataset size) into a frozen `Resolved`:
the numbers the guide's table picks for `auto` hyper-parameters, the weight dtype, the autocast
precision, where gradient checkpointing applies and how many tokens a packed pass holds. Training,
`lorakit plan`, the diagnostics and `lorakit doctor` all read these decisions from here, so the plan
describes the run that training will do, and a rule changes in one place.

`Machine` is the only thing that looks at the hardware. It is a value: plan passes the machine it
plans for (a GPU it is not running on, say), and tests pass fakes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field

from lorakit.config import AUTO, Config, ModelConfig
from lorakit.errors import LorakitError, ModelError

# --------------------------------------------------------------------------- the machine


@dataclass(frozen=True)
class Machine:
    """What the rules need to know about the hardware that will train."""

    device: str  # "cpu" | "cuda"
    bf16: bool  # native bf16 math: the GPU's, or the CPU's AVX512-BF16 / AMX-BF16 (else emulated, slow)
    name: str = ""  # the GPU's name, for error messages

    @staticmethod
    def detect() -> "Machine":
        """This process's machine: the first CUDA device if there is one, else the CPU."""
        import torch

        if torch.cuda.is_available():
            return Machine("cuda", torch.cuda.is_bf16_supported(including_emulation=False),
                           torch.cuda.get_device_name())
        return Machine("cpu", cpu_has_native_bf16())

    @staticmethod
    def for_device(device: str) -> "Machine":
        """The machine to plan for: this one when it is of that kind, else a typical one
        (a bf16-capable GPU, or this machine's CPU)."""
        here = Machine.detect()
        if here.device == device:
            return here
        if device == "cuda":
            return Machine("cuda", True, "a bf16-capable GPU")
        return Machine("cpu", cpu_has_native_bf16())


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in /proc/cpuinfo: without them CPU bf16 autocast is emulated and slow."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


# --------------------------------------------------------------------------- the guide's table


@dataclass(frozen=True)
class GuideRow:
    """One column of the guide's hyper-parameter table; ranges start at their low end."""

    name: str
    rows: str
    r: int
    alpha: int
    dropout: float
    lr: float
    epochs: int
    batch_size: int
    ranges: dict[str, str] = field(default_factory=dict, compare=False)


GUIDE = (
    GuideRow("small", "<1k rows", 8, 16, 0.1, 1e-4, 5, 4,
             {"r": "8", "alpha": "16", "epochs": "5-10", "batch_size": "4-8"}),
    GuideRow("medium", "1k-10k rows", 16, 32, 0.05, 2e-4, 3, 8,
             {"r": "16-32", "alpha": "32-64", "epochs": "3-5", "batch_size": "8-16"}),
    GuideRow("large", ">10k rows", 32, 64, 0.05, 3e-4, 1, 16,
             {"r": "32-64", "alpha": "64-128", "epochs": "1-3", "batch_size": "16-32"}),
)
"""The guide's "Hyperparameter Tuning Guide" table. Where it gives a range, the low end is
used: the guide's advice is to start small (low rank) and scale up."""

AUTO_KEYS = ("lora.r", "lora.alpha", "lora.dropout", "train.lr", "train.epochs", "train.batch_size")


def guide_row(n_train_rows: int) -> GuideRow:
    """The table column for a dataset of `n_train_rows` training examples."""
    if n_train_rows < 1000:
        return GUIDE[0]
    return GUIDE[1] if n_train_rows <= 10_000 else GUIDE[2]


def _hyperparameters(cfg: Config, n_train: int | None) -> tuple[Config, list[str]]:
    """A copy of `cfg` with every 'auto' among AUTO_KEYS replaced, and one note per replaced key.

    With a dataset size: the guide's value for it; alpha 'auto' is 2 × r (the guide's rule, equal to
    the table's alpha when r comes from the table too). Without one (data unreadable): the schema's
    default, said so in the note."""
    out = copy.deepcopy(cfg)
    row = guide_row(n_train) if n_train is not None else None
    notes = []
    for key in AUTO_KEYS:
        section, name = key.split(".")
        owner = getattr(out, section)
        if getattr(owner, name) != AUTO:
            continue
        if row is None:
            value = next(f.default for f in dataclasses.fields(owner) if f.name == name)
            why = "schema default; the dataset size is unknown"
        elif key == "lora.alpha" and out.lora.r != AUTO:
            value, why = 2 * out.lora.r, "2 × lora.r"
            if value == row.alpha:
                why = f"guide, {row.rows}"
        else:
            value, why = getattr(row, name), f"guide, {row.rows}"
        setattr(owner, name, value)
        rows = f"; {n_train:,} train rows" if n_train is not None else ""
        notes.append(f"{key}: auto → {value:g} ({why}{rows})")
    return out, notes


# --------------------------------------------------------------------------- device rules


def weight_dtype(mcfg: ModelConfig, machine: Machine) -> str:
    """'fp32' | 'bf16' | 'fp16': the dtype the base is loaded in (for 4/8-bit bases, the compute
    dtype of the quantized layers).

    'auto': bf16 on GPUs that support it natively, fp16 on older GPUs, fp32 on CPU, where fp32 is
    the safe choice (CPU bf16 speed varies by kernel; measure before switching); with 4/8-bit
    quantization bf16 on CPU too (bitsandbytes computes in bf16/fp16, never fp32 there)."""
    cuda = machine.device == "cuda"
    if mcfg.dtype == "auto":
        if cuda:
            return "bf16" if machine.bf16 else "fp16"
        return "bf16" if mcfg.quantization != "none" else "fp32"
    if mcfg.dtype == "fp16" and not cuda:
        raise ModelError(
            "fp16 is not supported on CPU (slow kernels, and training it needs a CUDA grad scaler)",
            hint="set model.dtype to 'auto', 'fp32' or 'bf16'",
            where="config model.dtype",
        )
    if mcfg.dtype == "bf16" and cuda and not machine.bf16:
        raise ModelError(
            f"this GPU ({machine.name or 'cuda'}) has no native bf16 support",
            hint="set model.dtype to 'fp16' or 'auto'",
            where="config model.dtype",
        )
    return mcfg.dtype


def attention(mcfg: ModelConfig) -> str | None:
    """The attention kernel to load the model with: `model.attn_implementation`, where 'auto' is
    None, transformers' own pick for the architecture: SDPA where the model supports it, eager where
    it does not (Gemma 2, whose soft-capped attention logits SDPA cannot compute). Forcing 'sdpa' on
    such a model is refused by transformers, with its reason."""
    return None if mcfg.attn_implementation == AUTO else mcfg.attn_implementation


def mixed_precision(cfg: Config, machine: Machine) -> str:
    """'bf16' | 'fp16' | 'no': the autocast precision; see TrainConfig.mixed_precision."""
    mp = cfg.train.mixed_precision
    if mp != "auto":
        if mp == "fp16" and machine.device != "cuda":
            raise LorakitError("train.mixed_precision fp16 needs a CUDA GPU (CPU autocast supports bf16 only)",
                               hint="use --train.mixed_precision bf16 or no", where="config train.mixed_precision")
        return mp
    if machine.device == "cuda":
        return "bf16" if machine.bf16 else "fp16"
    return "bf16" if machine.bf16 else "no"


CPU_TOKENS_PER_PASS = 512
"""Fastest of 384 / 512 / 1,024 on the quick benchmark (2 cores), and 20% less peak than 1,024."""
CUDA_TOKENS_PER_PASS = 8192
"""A GPU needs long passes to keep busy; 8k tokens is a common packed micro-batch. Not measured here."""


def tokens_per_pass(cfg: Config, machine: Machine) -> int | None:
    """Tokens per forward/backward pass of a packed step; None when batches are padded."""
    if not cfg.data.packing:
        return None
    if cfg.train.tokens_per_pass != AUTO:
        return int(cfg.train.tokens_per_pass)
    return CUDA_TOKENS_PER_PASS if machine.device == "cuda" else CPU_TOKENS_PER_PASS


def checkpoints_every_pass(mcfg: ModelConfig, machine: Machine) -> bool:
    """Whether every pass recomputes its activations: 'on', or 'auto' on GPUs, where memory is the
    usual limit (on CPU it only costs time)."""
    gc = mcfg.gradient_checkpointing
    return gc == "on" or (gc == "auto" and machine.device == "cuda")


def checkpointing(cfg: Config, machine: Machine) -> str:
    """'all' | 'oversize' | 'none': which passes recompute activations in the backward.

    Besides `checkpoints_every_pass`: 'auto' on CPU with packing checkpoints only a pass longer
    than tokens_per_pass (one long example), which would otherwise hold activations for its whole
    length ('oversize'); the other passes keep full speed."""
    if checkpoints_every_pass(cfg.model, machine):
        return "all"
    return "oversize" if cfg.model.gradient_checkpointing == "auto" and cfg.data.packing else "none"


# --------------------------------------------------------------------------- the resolved config


@dataclass(frozen=True)
class Resolved:
    """Every decision a run depends on, made once. `cfg` is a copy with no 'auto' hyper-parameters
    left (what the run folder's config.yaml records); treat it as read-only."""

    cfg: Config
    machine: Machine
    dtype: str  # weight dtype ('fp32' | 'bf16' | 'fp16'); compute dtype for 4/8-bit bases
    mixed_precision: str  # 'bf16' | 'fp16' | 'no'
    checkpointing: str  # 'all' | 'oversize' | 'none'
    tokens_per_pass: int | None  # packing only
    guide: GuideRow | None  # the guide's row for the dataset size, when it is known
    notes: tuple[str, ...] = ()  # one line per 'auto' hyper-parameter replaced

    @property
    def weights(self) -> str:
        """How the frozen base sits in memory: 'fp32' | 'bf16' | 'fp16' | '8bit' | '4bit'."""
        q = self.cfg.model.quantization
        return q if q != "none" else self.dtype

    @property
    def autocast_over_fp32(self) -> bool:
        """16-bit autocast over fp32 weights: matmuls read 16-bit copies of the weights."""
        return self.mixed_precision != "no" and self.weights == "fp32"

    @property
    def fast_half(self) -> str | None:
        """The dtype the fast path stores frozen LoRA base weights in: the autocast dtype, over
        unquantized weights, when the fast path is on; else None."""
        if not self.cfg.train.fast_path or self.cfg.model.quantization != "none" or self.mixed_precision == "no":
            return None
        return self.mixed_precision


TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
"""train.report_to name -> the package its Trainer integration imports (and `pip install` installs)."""


def check_trackers(cfg: Config) -> None:
    """Every tracker in train.report_to is importable, or one error naming each install command:
    found before training, not when the Trainer's integration first logs."""
    import importlib.util

    from lorakit.errors import ConfigError

    missing = [name for name in cfg.train.report_to if importlib.util.find_spec(TRACKERS[name]) is None]
    if missing:
        raise ConfigError([f"train.report_to: {name!r} is not installed; install it with `pip install "
                           f"{TRACKERS[name]}`, or remove it from train.report_to" for name in missing])


def resolve(cfg: Config, machine: Machine | None = None, n_train: int | None = None) -> Resolved:
    """Decide everything `auto` and machine-dependent in `cfg` (which is not modified).

    Raises LorakitError for a config this machine cannot run (fp16 on a CPU, bf16 on a GPU
    without it), before any work is spent."""
    machine = machine or Machine.detect()
    check_trackers(cfg)
    out, notes = _hyperparameters(cfg, n_train)
    return Resolved(
        cfg=out,
        machine=machine,
        dtype=weight_dtype(out.model, machine),
        mixed_precision=mixed_precision(out, machine),
        checkpointing=checkpointing(out, machine),
        tokens_per_pass=tokens_per_pass(out, machine),
        guide=guide_row(n_train) if n_train is not None else None,
        notes=tuple(notes),
    )
