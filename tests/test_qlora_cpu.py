"""QLoRA through bitsandbytes on CPU, and the 0.50 trap: an eval forward repacks Linear4bit
weights and the next backward silently gives wrong LoRA gradients.

lorakit turns `support_avx512bf16_for_cpu` off on every Linear4bit when it loads a 4-bit model.
The test compares the LoRA gradients of the 4-bit model, taken after an eval pass, with those of
the same network whose base weights are the dequantized 4-bit weights held in fp32 Linear layers.
"""

import copy

import pytest
import torch

import bitsandbytes as bnb  # a dev dependency: CI must fail, not skip, without it

from lorakit.config import LoraConfig, MergeConfig, ModelConfig  # noqa: E402
from lorakit.model.load import load_model  # noqa: E402
from lorakit.model.lora import apply_lora  # noqa: E402


@pytest.fixture(scope="module")
def qdir(tmp_path_factory):
    from conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("q"), hidden=128)


def dequantized_copy(model):
    """The same PEFT model with every Linear4bit replaced by an fp32 Linear of its dequantized weight."""
    ref = copy.deepcopy(model)
    for name, module in list(ref.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state).float()
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=child.bias is not None)
                lin.weight.data.copy_(w)
                if child.bias is not None:
                    lin.bias.data.copy_(child.bias.data.float())
                lin.weight.requires_grad_(False)
                setattr(module, child_name, lin)
    return ref.float()


def lora_grads(model, ids):
    model.zero_grad(set_to_none=True)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_four_bit_lora_gradients_after_eval_match_dequantized_reference(qdir):
    model, info = load_model(ModelConfig(name=str(qdir), quantization="4bit"), training=True)
    assert info.quantization == "4bit"
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and all(m.support_avx512bf16_for_cpu is False for m in linears), "the CPU workaround is applied"
    model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, init="gaussian"))
    with torch.no_grad():  # B starts at zero, which would zero A's gradient: give both a value
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))

    reference = dequantized_copy(model)  # taken before any eval pass could repack anything
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # the eval forward that triggers the trap when the workaround is off
    got = lora_grads(model, ids)
    want = lora_grads(reference, ids)
    assert got.keys() == want.keys() and got
    for name in want:
        g, w = got[name], want[name]
        assert g.abs().sum() > 0, f"{name}: gradient missing"
        # 4-bit matmuls compute in bf16 here (8 mantissa bits): a few per cent relative error
        assert torch.linalg.norm(g - w) <= 0.05 * torch.linalg.norm(w) + 1e-6, name


def test_qlora_training_run_on_cpu(qdir, tmp_path):
    """`lorakit train` with model.quantization 4bit: NF4 base, bf16 compute, adapter saved in fp32."""
    import json

    from safetensors.torch import load_file

    from conftest import ALPACA_ROWS, write_jsonl
    from lorakit import config
    from lorakit.train.run import train

    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    cfg = config.load(None, [f"--model.name={qdir}", "--model.quantization=4bit", f"--data.train={data}",
                             "--data.template=alpaca", "--lora.r=4", "--train.max_steps=2", "--train.batch_size=2",
                             "--train.lr=1e-2", "--train.eval_steps=0", "--train.save_steps=0",
                             f"--output.dir={tmp_path}", "--output.name=q"])
    run = train(cfg, log=lambda s: None, progress=False)
    meta = json.loads((run / "adapter" / "lorakit.json").read_text())
    assert meta["base_model"]["quantization"] == "4bit"
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k), "LoRA learned on the 4-bit base"
    # ... and that really 4-bit-trained adapter merges into the full-precision base, with both parities.
    from lorakit.merge import merge

    report = merge(run, tmp_path / "merged", MergeConfig(dtype="fp32"), log=lambda s: None)
    assert report.passed and report.parity.max_abs_diff <= report.tolerance
    assert report.quantized is not None and "4bit" in report.quantized.reference
    merged = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged and merged["dtype"] == "float32"
