"""The schema sections of the stages after training: generate, chat, eval, pairs, merge, export, serve.

Each section is the one owner of its stage's defaults: the stage function takes the section
object, the command's flags are generated from its fields (`lorakit.config.flags`), and a YAML file
may hold it (`serve:` in `lorakit serve --config FILE` works like the flags; the run's config.yaml
`export:` is what `lorakit export` starts from).  `lorakit.config.Config` holds them all, so
`lorakit config` lists them beside the training sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lorakit.config.declare import _help

InferenceDtype = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class SamplingConfig:
    """How an answer is decoded (`lorakit.infer.Sampling` is this class): the keys `generate:` and
    `chat:` share, so their defaults are written once."""

    max_new_tokens: int = _help("Longest answer, in tokens.", 256)
    temperature: float = _help("Sampling temperature: below 1 sharpens the distribution, above 1 flattens it.", 0.7)
    top_p: float = _help("Nucleus sampling: draw from the smallest set of tokens holding this probability.", 0.9)
    top_k: int = _help("Draw from the k most likely tokens only; 0: no limit.", 0)
    repetition_penalty: float = _help("Penalty on tokens already in the text (transformers' repetition_penalty); 1.0: off.", 1.0)
    greedy: bool = _help("Deterministic decoding: always the most likely token (ignores the sampling keys).", False)
    seed: int | None = _help("Seed of the sampling draws, for repeatable answers; null: a fresh draw each time.",
                             None)

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature <= 0


@dataclass
class SessionConfig:
    """How the base model is loaded for answering (`lorakit.infer.load_session`)."""

    dtype: InferenceDtype = _help(
        "Weight and compute precision of the answering model. 'auto' is bf16 on GPUs that support it, "
        "fp16 on other GPUs and fp32 on CPU.", "auto")
    trust_remote_code: bool = _help(
        "Run Python code shipped with the model repository. Off by default: it executes arbitrary code "
        "from the model's author.", False)


@dataclass
class GenerateConfig(SessionConfig, SamplingConfig):
    """`lorakit generate`: one answer to one prompt."""

    system: str | None = _help("System message of the conversation; null: the training data's (data.system_prompt).",
                               None)


@dataclass
class ChatConfig(SessionConfig, SamplingConfig):
    """`lorakit chat`: a multi-turn conversation in the terminal."""

    system: str | None = _help("System message the conversation starts with (/system changes it).", None)
    max_context: int | None = _help(
        "Treat the context window as this many tokens (at most the model's): for long chats on a model that "
        "degrades before its configured length, and for testing the history trimming; null: the model's.", None)


@dataclass
class EvalConfig:
    """`lorakit eval`: which held-out rows are scored, and how they are answered (greedily)."""

    data: list[str] = _help("Eval files (any training format); []: the run's split (eval.split).", factory=list)
    split: Literal["validation", "test"] = _help(
        "The run's validation split (as training made it) or its data.test files.", "validation")
    base: bool = _help("Also score the base model (prompted with the same template).", False)
    max_new_tokens: int | None = _help("Answer length limit, in tokens; null: the longest reference + 16.", None)
    batch_size: int = _help("Prompts answered per batch.", 16)
    limit: int | None = _help("Score only the first N examples; null: all of them.", None)


@dataclass
class PairsConfig:
    """`lorakit pairs`: DPO preference pairs from the held-out rows the adapter answers wrong (the
    reference is `chosen`, the adapter's answer `rejected`), found on the rows eval scores."""

    data: list[str] = _help("Files whose rows are answered (any training format); []: the run's split (pairs.split).",
                            factory=list)
    split: Literal["validation", "test"] = _help(
        "The run's validation split (as training made it) or its data.test files.", "validation")
    out: str | None = _help("The JSONL file the pairs are written to (its folder must exist); required.", None)
    metric: Literal["exact_match", "json_fields", "rouge_l"] = _help(
        "What makes an answer wrong: exact_match false (normalized, as eval scores it), JSON field accuracy "
        "below 1 (json_fields: every reference must be a JSON object or array), or ROUGE-L below "
        "pairs.threshold (rouge_l).", "exact_match")
    threshold: float = _help("rouge_l only: an answer scoring below this ROUGE-L is wrong.", 0.5)
    samples: int = _help(
        "Sampled answers drawn per row besides the greedy one (at pairs.temperature, no top-p/top-k cut); "
        "each distinct wrong answer becomes a pair of its own. 0: the greedy answer only.", 0)
    temperature: float = _help("Sampling temperature of the pairs.samples answers.", 0.8)
    seed: int = _help("Seed the sampled answers' per-row seeds are derived from: the same seed writes the same file.",
                      0)
    max_new_tokens: int | None = _help("Answer length limit, in tokens; null: the longest reference + 16 (as eval).",
                                       None)
    batch_size: int = _help("Prompts answered per batch.", 16)
    limit: int | None = _help("Answer only the first N rows of each set; null: all of them.", None)


@dataclass
class MergeConfig:
    """`lorakit merge`: the adapter folded into its base, checked against base + adapter."""

    dtype: Literal["fp32", "bf16", "fp16"] = _help(
        "Weight dtype of the merged model (the merge itself is done in fp32).", "fp32")
    overwrite: bool = _help("Replace the output folder if it exists and is not empty.", False)


@dataclass
class ExportConfig:
    """`lorakit export`: what a GGUF must keep of the fine-tune, and how it is quantized. Read from
    the run's config.yaml (so a training config can set it once); the export command's flags win."""

    gguf: str = _help(
        "GGUF type: f32, f16, bf16 (no quantization), q8_0, q6_k, q5_k_m, q4_k_m, iq4_xs, q4_0 "
        "(llama-quantize's per-tensor mixes), or 'auto': export the candidates (export.auto_types) "
        "from the smallest file up and keep the first whose task-level drop is within export.max_drop.",
        "q4_k_m",
    )
    max_drop: float = _help(
        "Task-level check: the GGUF's metric on the eval set (answered greedily in llama.cpp) may be at "
        "most this many points (percent) below the merged model's in transformers; a larger drop fails "
        "the export and nothing is published. Negative: report only, never fail.",
        3.0,
    )
    eval_data: list[str] = _help(
        "Files answered by the task-level check; []: the run's validation split (data.validation, or "
        "the seeded split of data.train).",
        factory=list,
    )
    eval_limit: int = _help("Answer at most this many rows in the task-level check; 0: all of them.", 0)
    max_new_tokens: int = _help(
        "Longest answer of the task-level check, in tokens; 0: room for the longest reference plus 16 "
        "(as lorakit eval).", 0)
    metric: Literal["auto", "exact_match", "json_field_accuracy", "rouge_l"] = _help(
        "The task-level check's metric (the eval stage's scorer): 'auto' is JSON field accuracy when "
        "every reference is a JSON object, else exact match.",
        "auto",
    )
    imatrix: Literal["auto", "on", "off"] = _help(
        "Importance-weighted quantization (llama.cpp's imatrix): the mean squared activation of every "
        "input column, collected on the merged model over the run's training rows rendered with the "
        "trained template, weights each tensor's rounding error. 'auto': on for 4-bit and smaller types "
        "(q4_k_m, iq4_xs, q4_0). Written beside the GGUF as <file>.imatrix.gguf (llama-quantize --imatrix).",
        "auto",
    )
    imatrix_rows: int = _help("Training rows the importance matrix is collected on (the first N of a seeded shuffle).",
                              256)
    imatrix_text: str | None = _help(
        "A plain-text file of general text to collect on as well (chunks of 512 tokens), so the "
        "quantization does not trade general ability for the task; null: the run's rows only.",
        None,
    )
    imatrix_keep: float = _help(
        "With the importance matrix: a fine-tuned tensor whose weighted rounding keeps less than this "
        "share of the fine-tune's change (the projection of Q - W0 on W - W0), while plain rounding keeps "
        "more, is quantized plain. The weighting can land on the base's own grid and round the fine-tune "
        "away (export/delta.py). 0: weight every tensor, as llama-quantize does.",
        0.8,
    )
    max_size: float | None = _help(
        "The largest GGUF file to write, in MiB; null: no limit. Types whose file would be larger are "
        "not written, and the largest quantized type that fits gets its most sensitive tensors (KL on "
        "the run's training rows when only that tensor is quantized) one type wider until the file "
        "reaches the size: with a named type in place of its plain mix, with auto as the last candidate.",
        None,
    )
    sensitivity_rows: int = _help("Training rows the per-tensor sensitivity of --max-size is measured on.", 8)
    auto_types: list[str] = _help(
        "The candidates of --gguf auto, tried from the smallest file to the largest.",
        factory=lambda: ["iq4_xs", "q4_0", "q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16"],
    )


@dataclass
class ServeConfig:
    """`lorakit serve`: the models behind the OpenAI-compatible API and the limits every request meets."""

    adapters: list[str] = _help("Run or adapter folders to serve, each named after its run.", factory=list)
    adapter: list[str] = _help("Adapters under chosen names, as NAME=PATH.", factory=list)
    base: str | None = _help("The base model (must be the one the adapters were trained on); null: the adapters'.",
                             None)
    host: str = _help("Address to bind (a non-loopback one wants an API key).", "127.0.0.1")
    port: int = _help("Port to listen on.", 8000)
    api_key: str | None = _help(
        "Require Authorization: Bearer KEY (prefer the key file, --api-key-file: a command line is visible to "
        "other users).", None)
    api_key_file: str | None = _help("File holding the API key.", None)
    allow_adapter_loading: bool = _help("Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter.", False)
    adapter_root: list[str] = _help("Folders runtime loads may read from.", factory=list)
    max_batch: int = _help("Requests decoded together.", 32)
    max_queue: int = _help("Requests waiting before the server answers 429.", 256)
    max_tokens_cap: int = _help("The largest max_tokens a request may ask for.", 4096)
    timeout: float | None = _help("Seconds a request may take, from submission; null: no limit.", 600.0)
    drain_s: float = _help("Seconds running requests get to finish when the server is stopped.", 10.0)


@dataclass
class StudioConfig:
    """`lorakit studio`: the local web app over a folder of runs."""

    runs: str = _help("Folder of run folders the studio shows, and where the runs it starts go.", "runs")
    data: list[str] = _help(
        "Folders the New-run form may pick data files from (nothing outside them is read); [] or absent: "
        "the folder the studio is started in.", factory=list)
    host: str = _help("Address to bind. Anything but loopback requires the token.", "127.0.0.1")
    port: int = _help("Port to listen on.", 7860)
    token: str | None = _help(
        "Token a browser or script must present (the printed URL's ?token=, then a cookie; or Authorization: "
        "Bearer). null: none on 127.0.0.1, a new one printed at start on any other address.", None)
