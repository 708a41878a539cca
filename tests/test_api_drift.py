"""The library APIs lorakit is built on, checked by name: a release that renames one fails here first.

lorakit subclasses the transformers Trainer and reaches into a few of its hooks; these tests
pin the exact names and parameters used, so a version bump that breaks them is caught by CI
with a message pointing at the changed API rather than deep inside a training run.
"""

import inspect

import pytest


def params(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def test_training_arguments_names_we_pass():
    from transformers import TrainingArguments

    used = {"output_dir", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
            "num_train_epochs", "max_steps", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay",
            "max_grad_norm", "optim", "seed", "data_seed", "logging_strategy", "logging_steps", "logging_first_step",
            "logging_nan_inf_filter", "eval_strategy", "eval_steps", "eval_on_start", "save_strategy", "save_steps",
            "save_total_limit", "bf16", "fp16", "report_to", "disable_tqdm", "remove_unused_columns",
            "dataloader_num_workers", "use_cpu", "use_cache"}
    missing = used - params(TrainingArguments.__init__)
    assert not missing, f"TrainingArguments no longer accepts {missing}"


def test_trainer_hooks_we_override():
    from transformers import Trainer

    assert {"model", "inputs", "return_outputs", "num_items_in_batch"} <= params(Trainer.compute_loss)
    assert {"model", "inputs", "num_items_in_batch"} <= params(Trainer.training_step)
    assert {"model", "trial"} <= params(Trainer._save_checkpoint)
    assert {"trial"} <= params(Trainer._get_output_dir)
    assert {"output_dir"} <= params(Trainer._save_rng_state)
    assert "resume_from_checkpoint" in params(Trainer.train)
    src = inspect.getsource(Trainer)
    assert "loss_is_scaled_for_ga" in src, "the Trainer no longer reads loss_is_scaled_for_ga"
    assert "_get_output_dir(trial=trial)" in inspect.getsource(Trainer._save_checkpoint)


def test_checkpoint_utilities():
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

    assert PREFIX_CHECKPOINT_DIR == "checkpoint"
    assert {"output_dir", "save_total_limit", "best_model_checkpoint"} <= params(rotate_checkpoints)


def test_packed_sequences_are_detected_from_position_ids():
    import torch
    from transformers.masking_utils import find_packed_sequence_indices

    got = find_packed_sequence_indices(torch.tensor([[0, 1, 0, 1, 2, 0]]))
    assert got.tolist() == [[0, 0, 1, 1, 1, 2]]


def test_peft_names():
    from peft import LoraConfig, PeftModel

    assert {"r", "lora_alpha", "lora_dropout", "target_modules", "bias", "modules_to_save", "use_rslora", "use_dora",
            "init_lora_weights", "task_type"} <= params(LoraConfig.__init__)
    assert hasattr(PeftModel, "disable_adapter") and "is_trainable" in params(PeftModel.from_pretrained)


def test_generation_and_logging_names():
    from transformers import PrinterCallback
    from transformers.generation.streamers import BaseStreamer
    from transformers.integrations import TensorBoardCallback

    assert "tb_writer" in params(TensorBoardCallback.__init__)
    assert hasattr(BaseStreamer, "put") and hasattr(BaseStreamer, "end") and PrinterCallback


@pytest.mark.parametrize("name", ["torch", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors"])
def test_installed_versions_satisfy_lorakits_ranges(name):
    from importlib import metadata

    from packaging.requirements import Requirement

    reqs = {Requirement(r).name: Requirement(r) for r in metadata.requires("lorakit") or []}
    assert metadata.version(name) in reqs[name].specifier
