"""The user's guide's training recipe (shared/seed/lora-fine-tuning-guide.md), ported to the
current TRL `SFTTrainer` + PEFT API, as one side of the benchmark.

    python benchmarks/recipe.py --model DIR --train FILE --out DIR [--steps 30] [--result FILE]

trains a LoRA adapter for `--steps` optimizer steps, saves it to `OUT/adapter` and prints one
JSON line (also written to `--result`): tokens/s, peak RSS, losses (see common.py for how each
is measured). `compare.py` runs it in its own process.

The guide's settings are kept; what had to change on transformers 5.x / TRL 1.x / a CPU:

- DataCollatorForCompletionOnlyLM is gone: TRL 1.x trains completion-only from a
  prompt/completion dataset, so the guide's Alpaca text is split at "### Response:\\n" into a
  prompt and a completion (TRL appends EOS to the completion and trains it).
- SFTTrainer(tokenizer=, max_seq_length=, dataset_text_field=) → processing_class= and
  SFTConfig(max_length=2048); max_length must be set: it defaults to 1024 and truncates silently.
- evaluation_strategy → eval_strategy; warmup_ratio=0.03 → warmup_steps=0.03 (a float < 1 is a
  ratio); group_by_length=True → train_sampling_strategy="group_by_length".
- No in-training evaluation: the guide evaluates every 100 steps, which a benchmark of ≤ 100
  steps never reaches; the held-out loss of both sides is computed afterwards by compare.py.
  For the same reason the guide's 10% train_test_split is not made: both sides train on the
  whole train file and are scored on the separate eval file.
- No 4-bit base: bitsandbytes NF4 + prepare_model_for_kbit_training target CUDA. The base is
  fp32 and bf16=True (as the guide sets it) is bf16 autocast on this CPU. `--precision fp32`
  turns it off: on a CPU without AVX512-BF16 or AMX, torch emulates bf16 matmuls (about 1
  GFLOP/s against 90 in fp32 on a 2-core AVX2 EPYC), and no user would train that way;
  compare.py passes it there.
- optim="adamw_torch" instead of "paged_adamw_32bit": paged optimizers need CUDA bitsandbytes.
- trust_remote_code=True and device_map="auto" dropped: a local Llama needs neither.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from common import Meter, MeteredMixin, emit, encode_rows, read_jsonl  # noqa: E402

RESPONSE = "### Response:\n"


def format_for_training(example: dict) -> dict:
    """The guide's Alpaca text, as a prompt (up to and including "### Response:\\n") and a completion."""
    if example.get("input"):
        prompt = f"### Instruction:\n{example['instruction']}\n\n### Input:\n{example['input']}\n\n{RESPONSE}"
    else:
        prompt = f"### Instruction:\n{example['instruction']}\n\n{RESPONSE}"
    return {"prompt": prompt, "completion": example["output"]}


def load_model_for_training(model_path: str):
    """The guide's loader without quantization (module doc): tokenizer with a pad token, no KV cache,
    gradient checkpointing on."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.pad_token_id = tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.config.use_cache = False
    model.gradient_checkpointing_enable()  # the guide's call (transformers 5.24: activation_checkpointing_enable)
    return model, tokenizer


def configure_lora(model, rank: int = 16, alpha: int = 32, dropout: float = 0.05):
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_dropout=dropout,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )
    return get_peft_model(model, lora_config)


class MeteredSFTTrainer(MeteredMixin, SFTTrainer):
    """SFTTrainer whose micro-batches are counted by a `Meter` (common.py)."""

    def __init__(self, *args, meter: Meter, **kwargs):
        super().__init__(*args, callbacks=[meter], **kwargs)
        self.meter = meter


def create_trainer(model, tokenizer, train_dataset, output_dir: str, max_steps: int, meter: Meter,
                   sampling: str = "group_by_length", precision: str = "bf16"):
    training_args = SFTConfig(
        output_dir=output_dir,
        # Batch size settings: effective batch 4 × 4 = 16
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=4,
        # Learning rate and schedule
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,  # was warmup_ratio=0.03
        # Training duration: the guide's 3 epochs, cut to the benchmark's step count
        num_train_epochs=3,
        max_steps=max_steps,
        # Logging and checkpointing
        logging_steps=10,
        save_steps=100,
        save_total_limit=3,
        eval_strategy="no",  # see module doc: no eval inside the benchmark's short runs
        # Optimization settings
        optim="adamw_torch",  # the guide's paged_adamw_32bit needs CUDA bitsandbytes
        weight_decay=0.01,
        max_grad_norm=0.3,
        # Mixed precision
        fp16=False,
        bf16=precision == "bf16",  # the guide's bf16=True unless --precision fp32 (module doc)
        # Misc
        train_sampling_strategy=sampling,  # the guide's group_by_length=True; "random" for the order study
        report_to="tensorboard",
        run_name="lora-fine-tune",
        # SFTTrainer arguments that moved into SFTConfig
        max_length=2048,  # was max_seq_length=2048; the default 1024 would truncate
        packing=False,
        gradient_checkpointing=True,
        seed=42,
        use_cpu=not torch.cuda.is_available(),  # transformers 5 refuses bf16=True on CPU without it
    )
    return MeteredSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        meter=meter,
    )


def tokenization_matches_lorakit(trainer, tokenizer, rows: list[dict]) -> float:
    """Fraction of rows whose TRL input_ids and labels equal lorakit's alpaca Template.encode."""
    ours = encode_rows(tokenizer, rows)
    theirs = trainer.train_dataset
    same = sum(list(t["input_ids"]) == ids and list(t["labels"]) == labels
               for t, (ids, labels) in zip(theirs, ours))
    return same / len(rows) if len(theirs) == len(rows) else 0.0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local model folder (safetensors + tokenizer)")
    p.add_argument("--train", required=True, help="Alpaca JSONL train file")
    p.add_argument("--out", required=True, help="output folder; the adapter goes to OUT/adapter")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps")
    p.add_argument("--result", help="also write the result JSON here")
    p.add_argument("--sampling", default="group_by_length", choices=["group_by_length", "random"],
                   help="the Trainer's train_sampling_strategy: the guide's group_by_length, or random (the "
                        "order lorakit's Trainer draws with the same seed, for comparing step by step)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                   help="bf16 autocast as the guide sets it, or fp32 for CPUs that emulate bf16 (module doc)")
    a = p.parse_args(argv)

    t_start = time.perf_counter()
    rows = read_jsonl(a.train)
    dataset = Dataset.from_list(rows).map(format_for_training, remove_columns=["instruction", "input", "output"])
    model, tokenizer = load_model_for_training(a.model)
    model = configure_lora(model)
    meter = Meter()
    trainer = create_trainer(model, tokenizer, dataset, a.out, a.steps, meter, a.sampling, a.precision)
    setup_seconds = time.perf_counter() - t_start
    train_result = trainer.train()
    adapter = Path(a.out) / "adapter"
    trainer.save_model(str(adapter))
    result = {
        "side": "recipe",
        **meter.result(),
        "mean_train_loss": train_result.training_loss,
        "setup_seconds": setup_seconds,
        "adapter": str(adapter),
        "compute_dtype": "bf16" if trainer.args.bf16 else "fp32",
        "settings": {"precision": "fp32 weights + bf16 autocast" if trainer.args.bf16 else "fp32",
                     "batches": "padded, length-grouped (group_by_length)" if a.sampling == "group_by_length"
                     else "padded, random order", "loss": "TRL completion-only"},
        "tokenization_matches_lorakit": tokenization_matches_lorakit(trainer, tokenizer, rows),
    }
    emit(result, a.result)
    return result


if __name__ == "__main__":
    main()
