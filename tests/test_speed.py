"""The fast path (lorakit.train.speed) computes what the stock PEFT/transformers path computes."""

import json
import logging
import os
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ALPACA_ROWS, write_jsonl
from lorakit import config
from lorakit.config import LoraConfig, ModelConfig
from lorakit.errors import LorakitError
from lorakit.data.collate import Collator, PackedCollator
from lorakit.model.load import load_model
from lorakit.model.lora import apply_lora
from lorakit.model import dropout as fast_dropout
from lorakit.model import lora_runtime
from lorakit.train import speed
from lorakit.model.loss import labelled_loss, split_head
from lorakit.data.collate import PASSES, SEGMENTS, pack_bins, segment_bounds, split_passes

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _model(model_dir, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    m, _ = load_model(ModelConfig(name=str(model_dir), dtype="fp32"), training=True)
    m = apply_lora(m, LoraConfig(r=4, alpha=8, dropout=dropout, init="gaussian"))
    with torch.no_grad():  # B = 0 at init would hide every LoRA term: give it values
        for i, (name, p) in enumerate(m.named_parameters()):
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    m.train()
    return m


def _examples(vocab: int, lengths=((9, 5), (17, 10), (4, 1), (23, 12))):
    g = torch.Generator().manual_seed(1)
    out = []
    for n, prompt in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _loss_and_grads(model, batch, n, autocast: bool):
    model.zero_grad()
    with torch.autocast(**BF16, enabled=autocast):
        loss = labelled_loss(*split_head(model), batch, n)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def _close(a: dict, b: dict, rtol: float):
    for k in a:
        err = float((a[k] - b[k]).norm() / b[k].norm())
        assert err < rtol, f"{k}: relative gradient difference {err:.2e}"


# --------------------------------------------------------------------------- dropout mask


def test_keep_mask_draws_bernoulli_from_every_lane():
    torch.manual_seed(0)
    keep = fast_dropout.keep_mask(torch.Size([4096, 1024]), 0.5, torch.device("cpu"))
    lanes = keep.view(-1, 4).float().mean(0)  # the four 16-bit lanes of each 64-bit word
    assert torch.allclose(lanes, torch.full((4,), 0.5), atol=3e-3), lanes
    sparse = fast_dropout.keep_mask(torch.Size([4096, 1024]), 0.05, torch.device("cpu")).float().mean()
    assert abs(float(sparse) - fast_dropout.kept_fraction(0.05)) < 1e-3
    assert abs(fast_dropout.kept_fraction(0.05) - 0.95) < 1e-4


@pytest.mark.parametrize("dtype,form", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                        (torch.float32, torch.uint8)])
def test_keep_mask_for_a_float_type_is_the_bool_mask_as_zeros_and_ones(dtype, form):
    """The same random words give the same mask in either form: only the representation changes
    (0/1 in a 16-bit type itself; bytes for fp32, which torch multiplies faster than bools)."""
    for p in (0.05, 0.3, 0.5, 1 / 65536):
        gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
        flags = fast_dropout.keep_mask(torch.Size([333, 97]), p, torch.device("cpu"), gen())
        ones = fast_dropout.keep_mask(torch.Size([333, 97]), p, torch.device("cpu"), gen(), dtype=dtype)
        assert ones.dtype == form and ones.shape == flags.shape
        assert torch.equal(ones, flags.to(form)), p
        other = fast_dropout.keep_mask(torch.Size([333, 97]), p, torch.device("cpu"), torch.Generator().manual_seed(8), dtype=dtype)
        assert p < 0.01 or not torch.equal(other, ones)  # another seed, another mask (the test can tell)
    assert torch.equal(fast_dropout.keep_mask(torch.Size([3, 5]), 0.0, torch.device("cpu"), dtype=dtype), torch.ones(3, 5, dtype=form))


def test_fast_dropout_scales_kept_values_and_their_gradient():
    torch.manual_seed(0)
    drop = fast_dropout.FastDropout(0.25).train()
    x = torch.randn(64, 32, requires_grad=True)
    y = drop(x)
    kept = y != 0
    scale = 1 / fast_dropout.kept_fraction(0.25)
    assert torch.allclose(y[kept], x[kept] * scale)
    assert 0.65 < kept.float().mean() < 0.85
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() * scale)
    assert torch.equal(drop.eval()(x), x)


def test_only_lora_dropouts_are_replaced(tiny_model_dir):
    m = _model(tiny_model_dir, dropout=0.1)
    n = speed.fast_lora_dropout(m)
    assert n == sum(1 for mod in m.modules() if isinstance(mod, fast_dropout.FastDropout)) > 0
    assert speed.fast_lora_dropout(m) == 0  # idempotent


# --------------------------------------------------------------------------- fused LoRA linear


def test_fused_lora_equals_peft_under_autocast(tiny_model_dir):
    """Same loss as PEFT's own forward over the same half-precision weights, and gradients at least
    as close to the fp32 result as PEFT's bf16 ones (the two round in different places, so they
    differ from each other by about as much as each differs from fp32: up to ~3% per tensor)."""
    ref, stock, fused = (_model(tiny_model_dir) for _ in range(3))
    for m in (stock, fused):
        assert speed.freeze_in_half(m, torch.bfloat16) > 0
    assert speed.fuse_lora_linears(fused) > 0
    feats = _examples(stock.config.vocab_size)
    batch = Collator(0)(feats)
    n = int((batch["labels"][:, 1:] != -100).sum())
    _, grads_ref = _loss_and_grads(ref, batch, n, autocast=False)
    loss_s, grads_s = _loss_and_grads(stock, batch, n, autocast=True)
    calls = []
    real = lora_runtime._LoraLinear.apply
    lora_runtime._LoraLinear.apply = lambda *a: calls.append(1) or real(*a)
    try:
        loss_f, grads_f = _loss_and_grads(fused, batch, n, autocast=True)
    finally:
        lora_runtime._LoraLinear.apply = real
    assert len(calls) == 7 * fused.config.num_hidden_layers, "every LoRA linear went through the fused node"
    assert abs(loss_s - loss_f) < 2e-3 * abs(loss_s)
    err = lambda g, k: float((g[k] - grads_ref[k]).norm() / grads_ref[k].norm())  # noqa: E731
    close = lambda g, k: err(g, k) <= 2 * err(grads_s, k) + 1e-3  # noqa: E731
    assert all(close(grads_f, k) for k in grads_ref), [k for k in grads_ref if not close(grads_f, k)]
    assert sum(err(grads_f, k) for k in grads_ref) <= 1.2 * sum(err(grads_s, k) for k in grads_ref)
    # and a negative control: the same checks reject a fused path that forgot the LoRA term
    for mod in fused.modules():
        if hasattr(mod, "lora_A"):
            mod.scaling = {k: 0.0 for k in mod.scaling}
    _, grads_wrong = _loss_and_grads(fused, batch, n, autocast=True)
    assert not any(close(grads_wrong, k) for k in grads_ref)


def test_fused_lora_with_dropout_matches_the_same_mask_by_hand(tiny_model_dir, monkeypatch):
    fused = _model(tiny_model_dir, dropout=0.3)
    speed.freeze_in_half(fused, torch.bfloat16)
    speed.fuse_lora_linears(fused)
    layer = fused.base_model.model.model.layers[0].self_attn.q_proj
    masks = []
    real = fast_dropout.keep_mask
    monkeypatch.setattr(lora_runtime, "keep_mask", lambda *a, **k: masks.append(real(*a, **k)) or masks[-1])
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    with torch.autocast(**BF16):
        y = layer(x)
    y.float().sum().backward()
    (keep,) = masks
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"] / fast_dropout.kept_fraction(0.3)
    xr = x.detach().clone().requires_grad_()
    ar, br = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = xr @ layer.base_layer.weight.float().t() + s * ((xr * keep) @ ar.t()) @ br.t()
    ref.sum().backward()
    assert torch.allclose(y.float(), ref, atol=0.05, rtol=0.02)
    for got, want in ((x.grad, xr.grad), (a.grad, ar.grad), (b.grad, br.grad)):
        assert float((got - want).norm() / want.norm()) < 2e-2


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_equals_peft_in_fp32(tiny_model_dir, dropout):
    """An fp32 run fuses too (`speed.apply` without autocast) and computes PEFT's step in another
    order of the same fp32 operations: the loss within 1e-5 and every gradient within 1e-4 of PEFT's
    (fp32 rounding, ~6e-8 per operation, over sums of at most a few hundred terms, with room to
    spare), the same dropout masks drawn from the same seed. In eval PEFT's own forward runs."""
    ref, fused = _model(tiny_model_dir, dropout=dropout), _model(tiny_model_dir, dropout=dropout)
    for m in (ref, fused):
        speed.fast_lora_dropout(m)
    done = speed.apply(fused, None, packing=False)
    assert done["fused"] == 7 * fused.config.num_hidden_layers and done["saved"] == 0 and not done["unfused"]
    feats = _examples(fused.config.vocab_size)
    batch = Collator(0)(feats)
    n = int((batch["labels"][:, 1:] != -100).sum())
    torch.manual_seed(5)
    loss_r, grads_r = _loss_and_grads(ref, batch, n, autocast=False)
    calls = []
    real = lora_runtime._LoraLinear.apply
    lora_runtime._LoraLinear.apply = lambda *a: calls.append(1) or real(*a)
    try:
        torch.manual_seed(5)
        loss_f, grads_f = _loss_and_grads(fused, batch, n, autocast=False)
    finally:
        lora_runtime._LoraLinear.apply = real
    assert len(calls) == 7 * fused.config.num_hidden_layers, "every LoRA linear went through the fused node"
    assert loss_f == pytest.approx(loss_r, rel=1e-5)
    _close(grads_f, grads_r, rtol=1e-4)
    # negative control: the same check rejects a fused path that forgot the LoRA term
    scalings = {mod: mod.scaling for mod in fused.modules() if hasattr(mod, "lora_A")}
    for mod in scalings:
        mod.scaling = {k: 0.0 for k in mod.scaling}
    torch.manual_seed(5)
    _, grads_wrong = _loss_and_grads(fused, batch, n, autocast=False)
    with pytest.raises(AssertionError):
        _close(grads_wrong, grads_r, rtol=1e-4)
    for mod, scaling in scalings.items():
        mod.scaling = scaling
    fused.eval()
    with torch.no_grad():
        assert torch.allclose(fused(**batch).logits, ref.eval()(**batch).logits, atol=1e-5)


def test_fp32_fusion_leaves_quantized_and_16_bit_bases_alone(tiny_model_dir):
    """Without autocast `speed.apply` fuses only a model whose LoRA bases are all fp32 nn.Linear."""
    m = _model(tiny_model_dir)
    _, lin = lora_runtime.lora_linears(m)[0]
    lin.base_layer.weight.data = lin.base_layer.weight.data.bfloat16()
    assert speed.apply(m, None, packing=False)["fused"] == 0


# --------------------------------------------------------------------------- when the fused node steps aside
# One test per condition of `lora_runtime.fusable`: each situation is made as a user (or PEFT) would make
# it, on layer 0's q_proj, and the call must run PEFT's own forward and log why.


def _ready(m):
    """What `speed.apply` does to a bf16 run's LoRA linears."""
    speed.freeze_in_half(m, torch.bfloat16)
    speed.fuse_lora_linears(m)
    return m


def _peft_model(model_dir, **lora):
    """The tiny model under PEFT's own LoraConfig, for settings lorakit's schema does not offer (lora_bias)."""
    import peft

    torch.manual_seed(0)
    m, _ = load_model(ModelConfig(name=str(model_dir), dtype="fp32"), training=True)
    m = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                               init_lora_weights=False, **lora))  # B random, not 0
    m.train()
    return m


def _layer(m, proj="q_proj"):
    return getattr(m.get_base_model().model.layers[0].self_attn, proj)


def _count_fused(monkeypatch) -> list:
    calls: list = []
    real = lora_runtime._LoraLinear.apply
    monkeypatch.setattr(lora_runtime._LoraLinear, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


def _falls_back(monkeypatch, caplog, m, reason: str, *, level=logging.INFO, autocast=True, ctx=nullcontext,
                input_dtype=torch.float32, **kwargs):
    """q_proj then k_proj, twice each: PEFT's forward every time (same output, no fused node), and one
    log record, at `level`, naming the first module and `reason`."""
    calls = _count_fused(monkeypatch)
    caplog.set_level(logging.DEBUG, logger="lorakit")
    for proj in ("q_proj", "k_proj", "q_proj"):
        layer = _layer(m, proj)
        x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0)).to(input_dtype)
        with ctx(), torch.autocast(**BF16, enabled=autocast), torch.no_grad():
            got = layer(x, **kwargs)
            want = type(layer).forward(layer, x, **kwargs)  # PEFT's forward, past the instance's fused one
        assert torch.equal(got, want), f"{proj}: the fallback is not PEFT's own forward"
    assert not calls, "the fused node ran"
    said = [r for r in caplog.records if r.name == lora_runtime.log.name]
    assert len(said) == 1, [r.getMessage() for r in said]
    msg = said[0].getMessage()
    assert said[0].levelno == level and reason in msg, msg
    assert "layers.0.self_attn.q_proj (Linear)" in msg, msg
    return msg


def test_fused_node_runs_for_plain_lora_in_training_under_autocast(tiny_model_dir, monkeypatch, caplog):
    m = _ready(_model(tiny_model_dir, dropout=0.1))
    speed.fast_lora_dropout(m)
    calls = _count_fused(monkeypatch)
    caplog.set_level(logging.DEBUG, logger="lorakit")
    layer = _layer(m)
    assert lora_runtime.fusable(layer, torch.zeros(1), (), {}) == lora_runtime.NO_AUTOCAST
    with torch.autocast(**BF16):
        assert lora_runtime.fusable(layer, torch.zeros(1), (), {}) is None
        layer(torch.randn(2, 5, layer.in_features))
        _layer(m, "o_proj")(torch.randn(2, 5, _layer(m, "o_proj").in_features))
    assert len(calls) == 2
    assert not [r for r in caplog.records if r.name == lora_runtime.log.name]


def test_eval_mode_falls_back_quietly(tiny_model_dir, monkeypatch, caplog):
    _falls_back(monkeypatch, caplog, _ready(_model(tiny_model_dir)).eval(), lora_runtime.EVAL, level=logging.DEBUG)


def test_no_autocast_over_a_16_bit_base_falls_back_quietly(tiny_model_dir, monkeypatch, caplog):
    m = _ready(_model(tiny_model_dir))  # bf16 base weights called without autocast: PEFT's own forward
    _falls_back(monkeypatch, caplog, m, lora_runtime.NO_AUTOCAST, level=logging.DEBUG, autocast=False,
                input_dtype=torch.bfloat16)


def test_extra_arguments_fall_back(tiny_model_dir, monkeypatch, caplog):
    m = _ready(_model(tiny_model_dir))
    _falls_back(monkeypatch, caplog, m, "called with extra arguments (adapter_names)", adapter_names=["default"] * 2)


def test_disabled_adapters_fall_back(tiny_model_dir, monkeypatch, caplog):
    m = _ready(_model(tiny_model_dir))
    _falls_back(monkeypatch, caplog, m, "adapters are disabled", ctx=m.disable_adapter)


def test_merged_adapter_falls_back(tiny_model_dir, monkeypatch, caplog):
    m = _ready(_model(tiny_model_dir))
    m.merge_adapter()
    _falls_back(monkeypatch, caplog, m, "the adapter is merged into the base weight")


def test_two_active_adapters_fall_back(tiny_model_dir, monkeypatch, caplog):
    import peft

    m = _ready(_model(tiny_model_dir))
    m.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"]))
    m.base_model.set_adapter(["default", "b"])
    _falls_back(monkeypatch, caplog, m, "2 active adapters")


def test_an_adapter_without_weights_here_falls_back(tiny_model_dir, monkeypatch, caplog):
    import peft

    m = _ready(_model(tiny_model_dir))
    m.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"]))
    m.set_adapter("b")
    _falls_back(monkeypatch, caplog, m, "the active adapter 'b' has no weights in this module")


def test_dora_falls_back(tiny_model_dir, monkeypatch, caplog):
    torch.manual_seed(0)
    m, _ = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"), training=True)
    m = _ready(apply_lora(m, LoraConfig(r=4, alpha=8, dropout=0.0, use_dora=True)).train())
    _falls_back(monkeypatch, caplog, m, "LoRA variant DoraLinearVariant (DoRA, use_dora)")


def test_lora_bias_falls_back(tiny_model_dir, monkeypatch, caplog):
    m = _ready(_peft_model(tiny_model_dir, lora_bias=True))
    _falls_back(monkeypatch, caplog, m, "the adapter has a bias (lora_bias)")


def test_fp32_base_weight_under_bf16_autocast_falls_back(tiny_model_dir, monkeypatch, caplog):
    m = _model(tiny_model_dir)
    speed.fuse_lora_linears(m)  # without freeze_in_half
    _falls_back(monkeypatch, caplog, m, "the base weight is torch.float32, autocast computes in torch.bfloat16")


def test_trainable_base_weight_falls_back(tiny_model_dir, monkeypatch, caplog):
    m = _ready(_model(tiny_model_dir))
    for proj in ("q_proj", "k_proj"):
        _layer(m, proj).base_layer.weight.requires_grad_(True)
    _falls_back(monkeypatch, caplog, m, "the base weight is trainable")


def test_a_base_layer_with_its_own_forward_falls_back(tiny_model_dir, monkeypatch, caplog):
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    m = _ready(_model(tiny_model_dir))
    for proj in ("q_proj", "k_proj"):
        layer = _layer(m, proj)
        old = layer.base_layer
        new = Doubled(old.in_features, old.out_features, bias=False, dtype=old.weight.dtype).requires_grad_(False)
        new.weight.copy_(old.weight)
        layer.base_layer = new
    _falls_back(monkeypatch, caplog, m, "the base layer is Doubled, not a plain nn.Linear")


def test_a_custom_dropout_falls_back(tiny_model_dir, monkeypatch, caplog):
    class Halving(nn.Dropout):  # an nn.Dropout by type, not by what it computes
        def forward(self, x):
            return x / 2

    m = _ready(_model(tiny_model_dir))
    for proj in ("q_proj", "k_proj"):
        _layer(m, proj).lora_dropout["default"] = Halving(0.1)
    _falls_back(monkeypatch, caplog, m, "LoRA dropout Halving")


def test_apply_reports_the_linears_that_never_fuse(tiny_model_dir, caplog):
    caplog.set_level(logging.INFO, logger="lorakit")
    plain = speed.apply(_model(tiny_model_dir), torch.bfloat16, packing=False)
    assert plain["fused"] == 7 * 2 and plain["unfused"] == {}
    assert not [r for r in caplog.records if r.name == speed.log.name]
    m = _peft_model(tiny_model_dir, lora_bias=True)
    done = speed.apply(m, torch.bfloat16, packing=False)
    assert done["fused"] == 3 * 2
    assert done["unfused"] == {"the adapter has a bias (lora_bias)": 6}
    (record,) = [r for r in caplog.records if r.name == speed.log.name]
    assert record.levelno == logging.INFO
    assert record.getMessage() == "fast path: 6 of 6 LoRA linears keep PEFT's forward: the adapter has a bias (lora_bias)"
    assert speed.apply(_model(tiny_model_dir), None, packing=False)["unfused"] == {}


# --------------------------------------------------------------------------- training-only models are marked


def test_a_model_after_the_fast_path_is_refused_by_later_stages(tiny_model_dir):
    fresh = _model(tiny_model_dir)
    speed.require_fresh(fresh, "merge")
    speed.require_fresh(fresh.get_base_model(), "merge")
    assert speed.training_changes(fresh) == []
    m = _model(tiny_model_dir, dropout=0.1)
    speed.apply(m, torch.bfloat16, packing=True)
    for obj in (m, m.base_model, m.get_base_model()):
        with pytest.raises(LorakitError) as e:
            speed.require_fresh(obj, "export")
        assert "changed for training by lorakit's fast path" in e.value.message
        assert "export reloads the base from disk" in e.value.message
        assert "LoRA base weights stored in bfloat16" in e.value.message and e.value.hint


@pytest.mark.parametrize("change, mark", [
    (lambda m: speed.freeze_in_half(m, torch.bfloat16), "LoRA base weights stored in bfloat16"),
    (speed.fuse_lora_linears, "LoRA forwards fused"),
    (speed.fast_lora_dropout, "LoRA dropouts replaced by FastDropout"),
    (speed.use_segment_attention, "attention per packed example"),
])
def test_each_in_place_change_marks_the_model(tiny_model_dir, change, mark):
    m = _model(tiny_model_dir, dropout=0.1)
    assert change(m)
    assert speed.training_changes(m) == [mark]
    assert speed.training_changes(m.get_base_model()) == [mark]
    with pytest.raises(LorakitError, match=mark):
        speed.require_fresh(m, "serve")


def test_changes_that_change_nothing_leave_no_mark(tiny_model_dir):
    m = _model(tiny_model_dir)  # dropout 0: nothing to replace
    speed.freeze_in_half(m, torch.bfloat16)
    assert speed.freeze_in_half(m, torch.bfloat16) == 0 and speed.fast_lora_dropout(m) == 0
    assert speed.training_changes(m) == ["LoRA base weights stored in bfloat16"]
    untouched = _model(tiny_model_dir)
    assert speed.fast_lora_dropout(untouched) == 0 and speed.training_changes(untouched) == []


def test_freeze_in_half_touches_only_frozen_lora_bases(tiny_model_dir):
    m = _model(tiny_model_dir)
    saved = speed.freeze_in_half(m, torch.bfloat16)
    halves = [n for n, p in m.named_parameters() if p.dtype == torch.bfloat16]
    assert halves and all("base_layer" in n for n in halves)
    assert all(p.dtype == torch.float32 for p in m.parameters() if p.requires_grad)
    assert saved == sum(p.numel() * 2 for p in m.parameters() if p.dtype == torch.bfloat16)
    inner = m.get_base_model()
    assert inner.lm_head.weight.dtype == torch.float32
    assert inner.lm_head.weight is inner.model.embed_tokens.weight  # still tied


# --------------------------------------------------------------------------- attention per example


def test_segment_attention_equals_block_mask_attention(tiny_model_dir):
    stock, seg = _model(tiny_model_dir), _model(tiny_model_dir)
    assert speed.use_segment_attention(seg)
    feats = _examples(stock.config.vocab_size)
    packed = PackedCollator()(feats)
    n = int((packed["labels"][:, 1:] != -100).sum())
    loss_s, grads_s = _loss_and_grads(stock, packed, n, autocast=False)
    loss_g, grads_g = _loss_and_grads(seg, packed, n, autocast=False)
    assert abs(loss_s - loss_g) < 1e-5 * abs(loss_s)
    _close(grads_g, grads_s, rtol=1e-4)
    loss_p, _ = _loss_and_grads(stock, Collator(0)(feats), n, autocast=False)
    assert abs(loss_p - loss_g) < 1e-5 * abs(loss_p)


def test_segment_attention_under_autocast_is_as_close_to_fp32_as_stock(tiny_model_dir):
    """Under bf16 autocast short examples attend in fp32: no further from the fp32 result than stock bf16."""
    stock, seg = _model(tiny_model_dir), _model(tiny_model_dir)
    speed.use_segment_attention(seg)
    packed = PackedCollator()(_examples(stock.config.vocab_size))
    n = int((packed["labels"][:, 1:] != -100).sum())
    loss_ref, grads_ref = _loss_and_grads(stock, packed, n, autocast=False)
    loss_s, grads_s = _loss_and_grads(stock, packed, n, autocast=True)
    loss_g, grads_g = _loss_and_grads(seg, packed, n, autocast=True)
    assert abs(loss_g - loss_ref) <= 1.5 * abs(loss_s - loss_ref) + 1e-4
    err = lambda g: sum(float((g[k] - grads_ref[k]).norm()) for k in g)  # noqa: E731
    assert err(grads_g) <= 1.5 * err(grads_s)


def test_segment_attention_node_equals_sdpa_per_example_in_fp32():
    """The one-node CPU path (`_SegmentAttention`) against SDPA on each example's fp32 slices, through
    autograd: same outputs and q/k/v gradients up to fp32 reordering. q/k/v are bf16 with the strides
    the model passes (heads transposed out of a (b, t, h, d) projection), with grouped-query heads."""
    torch.manual_seed(0)
    bounds = (0, 7, 40, 41, 97)
    t, d = bounds[-1], 16
    q = torch.randn(1, t, 4, d).bfloat16().transpose(1, 2).requires_grad_()
    k = torch.randn(1, t, 2, d).bfloat16().transpose(1, 2).requires_grad_()
    v = torch.randn(1, t, 2, d).bfloat16().transpose(1, 2).requires_grad_()
    up = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = torch.cat([F.scaled_dot_product_attention(up[0][:, :, s:e], up[1][:, :, s:e], up[2][:, :, s:e],
                                                    is_causal=True, scale=0.3, enable_gqa=True)
                     for s, e in zip(bounds[:-1], bounds[1:])], dim=2).transpose(1, 2)
    out = speed._SegmentAttention.apply(q, k, v, bounds, 0.3)
    assert out.dtype == torch.bfloat16 and out.shape == (1, t, 4, d)
    # the output is rounded to bf16 once: within half a bf16 ulp of the fp32 reference
    assert torch.allclose(out.float(), ref, rtol=2**-8, atol=1e-6)
    g = torch.randn(1, t, 4, d)
    (out.float() * g).sum().backward()
    (ref * g.bfloat16().float()).sum().backward()  # the node receives its gradient in bf16, as in a model
    for got, want in zip((q.grad, k.grad, v.grad), (x.grad for x in up)):
        assert got.dtype == torch.bfloat16
        assert torch.allclose(got.float(), want, rtol=2**-8, atol=1e-5), float((got.float() - want).abs().max())
    # negative control: the same comparison tells examples that attend across a boundary apart
    joined = speed._SegmentAttention.apply(q.detach(), k.detach(), v.detach(), (0, 40, 41, 97), 0.3)
    assert not torch.allclose(joined.float(), ref.detach(), rtol=2**-8, atol=1e-6)


def test_segment_attention_keeps_examples_apart(tiny_model_dir):
    m = _model(tiny_model_dir)
    speed.use_segment_attention(m)
    feats = _examples(m.config.vocab_size)
    body, _ = split_head(m)
    packed = PackedCollator(longest_first=False)(feats)
    bounds = segment_bounds(packed["position_ids"])
    assert bounds == [0, 9, 26, 30, 53]
    with torch.no_grad():
        h = body(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                 **{SEGMENTS: bounds}).last_hidden_state[0]
        for (a, b), f in zip(zip(bounds[:-1], bounds[1:]), feats):
            alone = body(input_ids=torch.tensor([f["input_ids"]])).last_hidden_state[0]
            assert torch.allclose(h[a:b], alone, atol=1e-5)


# --------------------------------------------------------------------------- passes by token budget


def test_pack_bins_group_examples_within_the_budget():
    # longest first: 50 opens a bin (14 left), 40 and 30 do not fit it, 10 does
    assert pack_bins([50, 40, 30, 10], 64) == [[0, 3], [1], [2]]
    assert pack_bins([50, 40, 30, 10], 1000) == [[0, 1, 2, 3]]
    assert pack_bins([300, 10], 64) == [[0], [1]]  # a long example gets a pass of its own
    assert pack_bins([10], 4) == [[0]]
    assert pack_bins([20, 30, 20], 40) == [[1], [0, 2]]  # ties keep their order


def test_split_passes_cuts_every_per_position_tensor():
    feats = _examples(100)  # 9, 17, 4, 23 tokens; longest first within 40: [23, 17] and [9, 4]
    packed = PackedCollator(tokens_per_pass=40)(feats)
    assert packed[PASSES] == [0, 40]
    parts = split_passes(packed)
    assert [p["input_ids"].shape[1] for p in parts] == [40, 13]
    assert all(p["position_ids"][0, 0] == 0 for p in parts) and all(PASSES not in p for p in parts)
    assert torch.equal(torch.cat([p["labels"] for p in parts], 1), packed["labels"])
    whole = PackedCollator()(feats)
    assert PASSES not in whole and len(split_passes(whole)) == 1


def _train(tmp_path, model_dir, name, *extra):
    from lorakit.train.run import train

    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS)
    cfg = config.load(None, [
        f"--model.name={model_dir}", f"--data.train={data}", "--data.template=alpaca", "--data.max_length=96",
        "--lora.r=4", "--lora.alpha=8", "--lora.dropout=0", "--train.batch_size=4", "--train.grad_accum=2",
        "--train.max_steps=2", "--train.logging_steps=1", "--train.eval_steps=0", "--train.save_steps=0",
        "--train.mixed_precision=no", "--data.val_fraction=0", f"--output.dir={tmp_path}", f"--output.name={name}",
        *extra,
    ])
    said: list[str] = []
    run = train(cfg, log=said.append, progress=False)
    from safetensors.torch import load_file

    (run / "said.txt").write_text("\n".join(said))
    return load_file(str(run / "adapter" / "adapter_model.safetensors")), run


def test_many_small_passes_train_like_one_big_one(tmp_path, tiny_model_dir, monkeypatch):
    from lorakit.train.trainer import LorakitTrainer

    passes: list[int] = []
    real = LorakitTrainer._passes
    monkeypatch.setattr(LorakitTrainer, "_passes", lambda self, inputs: passes.append(len(real(self, inputs)))
                        or real(self, inputs))
    one, _ = _train(tmp_path, tiny_model_dir, "one", "--train.tokens_per_pass=100000")
    assert passes == [1, 1]
    passes.clear()
    many, run = _train(tmp_path, tiny_model_dir, "many", "--train.tokens_per_pass=40")
    assert len(passes) == 2 and min(passes) >= 4, passes
    for k in one:
        assert torch.allclose(one[k], many[k], rtol=1e-4, atol=1e-6), k
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in records if "train_loss" in r or "loss" in r) >= 2


def test_fast_path_trains_like_the_stock_path(tmp_path, tiny_model_dir):
    fast, run = _train(tmp_path, tiny_model_dir, "fast", "--train.mixed_precision=bf16")
    assert "LoRA linears fused" in (run / "said.txt").read_text()
    stock, run = _train(tmp_path, tiny_model_dir, "stock", "--train.mixed_precision=bf16", "--train.fast_path=false")
    assert "fast path" not in (run / "said.txt").read_text()
    init, _ = _train(tmp_path, tiny_model_dir, "init", "--train.max_steps=1", "--train.lr=1e-12")
    for k in fast:
        moved = float((stock[k] - init[k]).norm())
        assert moved > 0
        assert float((fast[k] - stock[k]).norm()) < 0.1 * moved, k


def test_the_passes_are_first_fit_decreasing_bins():
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        lengths = torch.randint(1, 120, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        feats = [{"input_ids": [7] * n, "labels": [7] * n} for n in lengths]
        # first-fit decreasing, by hand: the fill of each bin
        fills: list[int] = []
        for n in sorted(lengths, reverse=True):
            i = next((i for i, f in enumerate(fills) if f + n <= 128), None)
            fills.append(n) if i is None else fills.__setitem__(i, fills[i] + n)
        passes = split_passes(PackedCollator(tokens_per_pass=128)(feats))
        assert [p["input_ids"].shape[1] for p in passes] == fills


def test_a_half_head_weight_gives_the_autocast_loss(tiny_model_dir):
    m = _model(tiny_model_dir)
    body, head = split_head(m)
    packed = PackedCollator()(_examples(m.config.vocab_size))
    n = int((packed["labels"][:, 1:] != -100).sum())
    with torch.no_grad(), torch.autocast(**BF16):
        plain = labelled_loss(body, head, packed, n)
        cached = labelled_loss(body, head, packed, n, head_weight=head.weight.to(torch.bfloat16))
    assert torch.equal(plain, cached)


def test_only_passes_longer_than_the_budget_recompute(tmp_path, tiny_model_dir, monkeypatch):
    """gradient_checkpointing auto with packing: a pass holding one over-long example is checkpointed,
    the others are not, and the trained adapter equals a run without any checkpointing."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from lorakit.train.trainer import LorakitTrainer

    seen: list[tuple[int, bool]] = []
    real = LorakitTrainer.compute_loss

    def spy(self, model, inputs, *a, **k):
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        seen.append((inputs["input_ids"].shape[1], all(m.gradient_checkpointing for m in layers)))
        return real(self, model, inputs, *a, **k)

    monkeypatch.setattr(LorakitTrainer, "compute_loss", spy)
    auto, run = _train(tmp_path, tiny_model_dir, "auto", "--train.tokens_per_pass=24")
    assert "only for passes over 24 tokens" in (run / "said.txt").read_text()
    assert any(n > 24 and ckpt for n, ckpt in seen), seen
    assert all(ckpt == (n > 24) for n, ckpt in seen), seen
    seen.clear()
    off, _ = _train(tmp_path, tiny_model_dir, "off", "--train.tokens_per_pass=24", "--model.gradient_checkpointing=off")
    assert seen and not any(ckpt for _, ckpt in seen)
    for k in auto:
        assert torch.allclose(auto[k], off[k], rtol=1e-5, atol=1e-7), k


def test_kernel_caches_are_bounded_unless_the_user_set_them(monkeypatch):
    for name in speed.KERNEL_CACHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")  # the user's own choice stays
    done = speed.bound_kernel_caches()
    assert done == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": speed.KERNEL_CACHES["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]}
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64" and os.environ["LRU_CACHE_CAPACITY"] == "7"
    assert speed.bound_kernel_caches() == {}
