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


def test_preference_trainer_hooks():
    """PreferenceTrainer counts pairs, not tokens, through the Trainer's item count, and evaluates
    through prediction_step; PeftModel.from_pretrained(is_trainable=True) continues an adapter."""
    from peft import PeftModel
    from transformers import Trainer

    assert {"batch_samples", "device"} <= params(Trainer._get_num_items_in_batch)
    assert "self._get_num_items_in_batch(" in inspect.getsource(Trainer.get_batch_samples)
    assert {"model", "inputs", "prediction_loss_only", "ignore_keys"} <= params(Trainer.prediction_step)
    assert "is_trainable" in params(PeftModel.from_pretrained)


def test_trl_dpo_api_the_benchmark_drives():
    """benchmarks/dpo.py runs TRL's DPOTrainer at its defaults as the comparison."""
    from trl import DPOConfig, DPOTrainer

    assert {"model", "args", "train_dataset", "processing_class", "peft_config"} <= params(DPOTrainer.__init__)
    fields = set(DPOConfig.__dataclass_fields__)
    assert {"beta", "loss_type", "precompute_ref_log_probs", "max_length", "padding_free"} <= fields
    assert DPOConfig(output_dir="x", use_cpu=True).loss_type == ["sigmoid"]


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


@pytest.mark.parametrize("name", ["torch", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors",
                                  "fastapi", "uvicorn", "openai", "optuna"])
def test_installed_versions_satisfy_lorakits_ranges(name):
    from importlib import metadata

    from packaging.requirements import Requirement

    reqs = {Requirement(r).name: Requirement(r) for r in metadata.requires("lorakit") or []}
    assert metadata.version(name) in reqs[name].specifier


# --------------------------------------------------------------------------- the fast path (lorakit.train.speed)
# It replaces PEFT's LoRA forward and transformers' attention for training, so it depends on
# names neither library calls public. Each is pinned here by what the fast path reads or sets.


def _lora_net(**lora):
    """A PEFT LoRA model around one nn.Linear, and that layer."""
    import torch
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 6)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], init_lora_weights=False,
                                             **lora))
    return model, model.base_model.model.proj


def test_peft_lora_linear_is_what_the_fast_path_recomputes():
    """`lora_runtime._fused_forward` replaces `peft.tuners.lora.layer.Linear.forward` with
    base_layer(x) + lora_B(lora_A(dropout(x)))·scaling, reading these attributes."""
    import torch
    from peft.tuners.lora.layer import Linear

    model, layer = _lora_net(lora_dropout=0.0)
    assert type(layer) is Linear, "speed.fuse_lora_linears finds LoRA linears by this exact class"
    assert {"x"} <= params(Linear.forward)
    kinds = {p.kind for p in inspect.signature(Linear.forward).parameters.values()}
    assert {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD} <= kinds
    assert isinstance(layer.base_layer, torch.nn.Linear)
    assert isinstance(layer.lora_A, torch.nn.ModuleDict) and isinstance(layer.lora_B, torch.nn.ModuleDict)
    assert layer.lora_A["default"].bias is None and layer.lora_B["default"].bias is None
    assert isinstance(layer.lora_dropout["default"], torch.nn.Identity), "PEFT's stand-in for lora_dropout 0"
    assert layer.scaling == {"default": 2.0}  # lora_alpha / r
    assert layer.active_adapters == ["default"]
    assert layer.merged is False and layer.disable_adapters is False
    assert layer.lora_variant == {} and layer.use_dora == {"default": False} and layer.lora_bias == {"default": False}
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
        assert torch.allclose(layer(x), want, atol=1e-6), "PEFT's vanilla LoRA forward computes something else"
    assert model.get_base_model().proj is layer and model.base_model.model.proj is layer


def test_peft_states_the_fast_path_steps_aside_for():
    """Each state `lora_runtime.fusable` checks, made the way PEFT makes it, shows in the attribute it reads."""
    import torch
    from peft import LoraConfig
    from peft.tuners.lora.variants import DoraLinearVariant

    _, layer = _lora_net(lora_dropout=0.1)
    assert type(layer.lora_dropout["default"]) is torch.nn.Dropout and layer.lora_dropout["default"].p == 0.1
    _, dora = _lora_net(use_dora=True)
    assert isinstance(dora.lora_variant["default"], DoraLinearVariant) and dora.use_dora["default"] is True
    _, biased = _lora_net(lora_bias=True)
    assert biased.lora_bias["default"] is True and biased.lora_B["default"].bias is not None
    model, layer = _lora_net()
    with model.disable_adapter():
        assert layer.disable_adapters is True
    assert layer.disable_adapters is False
    model.merge_adapter()
    assert layer.merged is True
    model.unmerge_adapter()
    model.add_adapter("b", LoraConfig(r=2, target_modules=["proj"]))
    model.base_model.set_adapter(["default", "b"])
    assert layer.active_adapters == ["default", "b"]


def test_torch_autocast_queries_the_fast_path_reads():
    import torch
    import torch.nn.functional as F

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)  # grouped-query heads, as segment_attention passes
    assert F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True).shape == q.shape


def test_cpu_flash_attention_ops_the_segment_node_calls():
    """`speed._SegmentAttention` calls torch's CPU flash-attention ops directly (private aten ops):
    forward (out, logsumexp, ...) with grouped-query k/v, and its backward, by these signatures."""
    import torch
    import torch.nn.functional as F

    q, kv = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, kv, kv, 0.0, True, scale=0.5)[:2]
    assert out.shape == q.shape and lse.shape == (1, 4, 5)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, kv, kv, is_causal=True, scale=0.5, enable_gqa=True),
                          atol=1e-6)
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        torch.ones_like(out), q, kv, kv, out, lse, 0.0, True, scale=0.5)
    assert [g.shape for g in grads] == [q.shape, kv.shape, kv.shape]


def _tiny_llama(**cfg):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, **cfg)
    return LlamaForCausalLM(config)


def test_attention_registry_and_the_config_switch():
    """`speed.use_segment_attention` registers with AttentionInterface and ALL_MASK_ATTENTION_FUNCTIONS, sets
    config._attn_implementation, and receives the `lorakit_segments` keyword passed to the model's forward."""
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from lorakit.train import speed

    assert callable(AttentionInterface.register) and callable(ALL_MASK_ATTENTION_FUNCTIONS.register)
    assert {"module", "query", "key", "value", "attention_mask", "dropout", "scaling", "is_causal"} <= params(
        sdpa_attention_forward)
    model = _tiny_llama(attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    assert speed.use_segment_attention(model)
    assert model.config._attn_implementation == speed.ATTENTION
    assert ALL_ATTENTION_FUNCTIONS.get_interface(speed.ATTENTION, None) is speed.segment_attention
    assert ALL_MASK_ATTENTION_FUNCTIONS[speed.ATTENTION] is sdpa_mask
    seen = []
    real = speed.segment_attention
    AttentionInterface.register(speed.ATTENTION, lambda *a, **k: seen.append(k.get(speed.SEGMENTS)) or real(*a, **k))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[3, 4, 5, 6, 7]]), position_ids=torch.tensor([[0, 1, 2, 0, 1]]),
                  **{speed.SEGMENTS: [0, 3, 5]})
    finally:
        AttentionInterface.register(speed.ATTENTION, real)
    assert seen == [[0, 3, 5]] * 2, "the model's keyword arguments no longer reach every layer's attention"


def test_gradient_checkpointing_is_switched_per_layer():
    """The trainer checkpoints only over-long passes by flipping `gradient_checkpointing` on each
    transformers.modeling_layers.GradientCheckpointingLayer between passes."""
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    from lorakit.model.load import enable_checkpointing

    assert GradientCheckpointingLayer.gradient_checkpointing is False
    model = _tiny_llama()
    enable_checkpointing(model)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(layers) == 2
    calls = []
    for layer in layers:
        real = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, real=real, **k: calls.append(1) or real(*a, **k)
    model.train()
    ids = torch.tensor([[3, 4, 5, 6]])
    for on in (False, True):
        calls.clear()
        for layer in layers:
            layer.gradient_checkpointing = on
        model(input_ids=ids).logits.sum().backward()
        assert len(calls) == (len(layers) if on else 0), f"gradient_checkpointing={on} is not read per layer"


# --------------------------------------------------------------------------- the server (lorakit.serve)
# The engine drives the model one decode step at a time with its own cache object and attention
# function, and hands PEFT the per-row adapter names through a pre-forward hook; `lorakit serve`
# replaces uvicorn's signal capture so the engine drains before the process exits.


def test_the_model_forward_and_attention_the_engine_drives():
    import transformers
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama import modeling_llama

    assert {"input_ids", "position_ids", "cache", "use_cache", "logits_to_keep"} <= \
        params(modeling_llama.LlamaForCausalLM.forward), "the engine passes cache= and logits_to_keep="
    src = inspect.getsource(modeling_llama.LlamaAttention.forward)
    assert "cache.update(key_states, value_states, self.layer_idx" in src, "_RowCache.update's call changed"
    assert "ALL_ATTENTION_FUNCTIONS.get_interface(" in src
    assert callable(transformers.AttentionInterface.register) and callable(sdpa_attention_forward)


def test_peft_takes_adapter_names_from_the_layer_kwargs():
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear

    assert issubclass(Linear, LoraLayer)
    src = inspect.getsource(Linear.forward)
    assert 'kwargs.pop("adapter_names", None)' in src, "the serve hook injects adapter_names into the kwargs"
    assert "_mixed_batch_forward" in src
    # what _LoraStack reads off each layer, and the per-adapter formula it reproduces
    model, layer = _lora_net()
    name = next(iter(layer.lora_A))
    assert {"lora_A", "lora_B", "scaling", "lora_variant", "use_dora", "base_layer"} <= set(dir(layer))
    assert layer.merged is False and name not in layer.lora_variant
    assert "lora_B(lora_A(dropout(sub_batch))) * scaling" in inspect.getsource(Linear._mixed_batch_forward)
    from peft.utils.other import AuxiliaryTrainingWrapper  # noqa: F401  (modules_to_save: kept on PEFT's path)


def test_uvicorn_and_fastapi_names_serve_uses():
    import uvicorn
    from fastapi import FastAPI, Request  # noqa: F401
    from fastapi.exceptions import RequestValidationError  # noqa: F401
    from fastapi.responses import JSONResponse, Response, StreamingResponse  # noqa: F401

    assert {"sig", "frame"} <= params(uvicorn.Server.handle_exit)
    # run() enters self.capture_signals(): the method lorakit serve's DrainingServer replaces
    assert "with self.capture_signals()" in inspect.getsource(uvicorn.Server), "uvicorn's signal capture moved"
    assert {"timeout_graceful_shutdown", "host", "port", "log_level"} <= params(uvicorn.Config.__init__)
    assert {"docs_url", "redoc_url", "openapi_url"} <= params(FastAPI.__init__)


def test_optuna_names_the_sweep_uses():
    """lorakit.sweep: the study, its storages and the retry of dead trials are Optuna's."""
    import optuna
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend

    assert {"heartbeat_interval", "grace_period", "heartbeat_stale_trial_callback", "engine_kwargs"} <= \
        params(RDBStorage.__init__)
    assert {"max_retry"} <= params(RetryHeartbeatStaleTrialCallback.__init__)
    assert {"log_storage"} <= params(JournalStorage.__init__) and callable(JournalFileBackend)
    assert {"study_name", "storage", "sampler", "pruner", "direction", "load_if_exists"} <= params(optuna.create_study)
    assert {"n_trials", "catch"} <= params(optuna.Study.optimize)
    assert {"params", "user_attrs", "skip_if_exists"} <= params(optuna.Study.enqueue_trial)
    for name in ("get_study_id_from_name", "get_trial_id_from_study_id_trial_number", "set_trial_state_values",
                 "set_trial_user_attr"):
        assert callable(getattr(RDBStorage, name)), name
    assert callable(optuna.samplers.GridSampler.is_exhausted)
    assert {"n_startup_trials", "n_warmup_steps"} <= params(optuna.pruners.MedianPruner.__init__)
    assert callable(optuna.importance.get_param_importances)
