"""Every model family through every stage, on tiny random models built from each family's own
transformers configuration class (conftest.family_config: q/k/v biases, q/k norms, soft-capping,
sliding windows, fused projections, tied and untied heads, experts).

Each test is one (family, stage) cell of the README's family table: the fast path's loss and LoRA
gradients equal PEFT + transformers' own on the same batch (or the fast path declines, saying
why), packed rows train as padded ones, greedy decoding (merge's and export's checks, eval,
generate, serve) agrees with transformers and does not depend on the batch, and merge keeps the
logits. `scripts/family_table.py` runs this file and writes the table from its outcomes.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import FAMILIES, build_tiny_model
from test_export_ollama import go_render  # noqa: F401  (the fixture: Go's text/template)

from lorakit.config import LoraConfig, ModelConfig
from lorakit.data.collate import Collator, PackedCollator
from lorakit.model.load import load_model
from lorakit.model.lora import apply_lora
from lorakit.model.loss import labelled_loss, split_head
from lorakit.train import speed

LENGTHS = ((41, 12), (9, 5), (30, 20), (17, 3))
"""(tokens, prompt tokens) of the examples packed into one row: two longer than the tiny models'
sliding window (conftest.SLIDING), so a kernel that ignored the window would change the loss."""


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    built: dict[str, object] = {}

    def get(family: str):
        if family not in built:
            built[family] = build_tiny_model(tmp_path_factory.mktemp(family), family=family)
        return built[family]

    return get


def _lora_model(model_dir, seed: int = 0):
    """The family's model with LoRA on every linear layer and non-zero B (so the LoRA terms count)."""
    torch.manual_seed(seed)
    m, _ = load_model(ModelConfig(name=str(model_dir), dtype="fp32"), training=True)
    m = apply_lora(m, LoraConfig(r=4, alpha=8, dropout=0.0, init="gaussian", target_modules="all-linear"))
    with torch.no_grad():
        for i, (name, p) in enumerate(m.named_parameters()):
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    m.train()
    return m


def _examples(vocab: int) -> list[dict]:
    from test_speed import _examples as examples

    return examples(vocab, LENGTHS)


def _grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_equals_transformers_own_path(family, family_dirs, caplog):
    """The loss and every LoRA gradient of a packed row through lorakit's fast path (fused LoRA
    linears, attention per packed example, the loss head on labelled positions) equal PEFT +
    transformers' own forward on the same examples padded; where the fast path cannot compute a
    family's attention it declines that part and says so."""
    folder = family_dirs(family)
    feats = _examples(_lora_model(folder).config.vocab_size)
    padded, packed = Collator(0)(feats), PackedCollator()(feats)
    n = int((packed["labels"][:, 1:] != -100).sum())

    stock = _lora_model(folder)
    stock.zero_grad()
    want = stock(**padded).loss
    want.backward()

    fast = _lora_model(folder)
    with caplog.at_level(logging.INFO, logger="lorakit.train.speed"):
        done = speed.apply(fast, None, packing=True)
    assert done["fused"] > 0
    softcapped = bool(getattr(fast.config, "attn_logit_softcapping", None))
    assert done["segments"] is not softcapped  # Gemma 2: transformers' eager attention, with its reason logged
    if softcapped:
        assert "soft-capped" in caplog.text
    fast.zero_grad()
    head = split_head(fast)
    got = labelled_loss(*head, packed, n) if head else fast(**packed).loss
    got.backward()

    # fp32 throughout: the paths differ only in summation order (packed vs padded rows, fused vs
    # PEFT's separate LoRA matmuls), so 1e-5 relative is float32 rounding over two layers
    assert torch.allclose(got, want, rtol=1e-5, atol=0), (got.item(), want.item())
    g_want, g_got = _grads(stock), _grads(fast)
    assert g_want.keys() == g_got.keys() and g_want
    for k in g_want:
        err = float((g_got[k] - g_want[k]).norm() / g_want[k].norm())
        assert err < 1e-4, f"{k}: relative gradient difference {err:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_train_as_padded_ones_without_the_fast_path(family, family_dirs):
    """fast_path: false still packs: transformers' own attention keeps the packed examples apart
    (and windowed) from their restarting positions."""
    model = _lora_model(family_dirs(family))
    feats = _examples(model.config.vocab_size)
    with torch.no_grad():
        padded = model(**Collator(0)(feats)).loss
        packed = model(**PackedCollator()(feats)).loss
    assert torch.allclose(packed, padded, rtol=1e-5, atol=0), (packed.item(), padded.item())


def _margin_ok(logits: torch.Tensor, chosen: int) -> bool:
    """The token greedy decoding chose is transformers' argmax too, unless the two best logits are
    within 1e-4 (a tie that float32 rounding of a different kernel may break either way; random
    tiny models have flat logits, and this is 100x the logit differences seen between kernels)."""
    top2 = logits.topk(2).values
    return int(logits.argmax()) == chosen or float(top2[0] - top2[1]) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_agrees_with_transformers_alone_and_batched(family, family_dirs, tmp_path):
    """lorakit's decoder (generate, chat, eval, merge's and export's checks, `lorakit serve`) on two
    adapters of the family's model: each request's greedy tokens are the same alone as in one batch
    with the others (prompts of different lengths, adapters mixed, past the sliding window), and
    each token is transformers' own argmax on the PEFT model with that adapter."""
    from conftest import make_adapter
    from transformers import AutoTokenizer

    from lorakit.infer import Decoder, Request, load_session

    folder = family_dirs(family)
    tok = AutoTokenizer.from_pretrained(folder)
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    ads = [make_adapter(folder, tok, tmp_path / f"a{i}", seed=7 + i, lora=lora, scale=0.2) for i in range(2)]
    session = load_session(ads, log=lambda s: None)
    names = list(session.adapters)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (30, 5, 17, 26)]
    reqs = [Request(p, 12, adapter=names[i % 2]) for i, p in enumerate(prompts)]
    with Decoder(session.model, adapters=names) as d:
        batched = [r.ids for r in d.run(reqs)]
        alone = [d.run([r])[0].ids for r in reqs]
    assert alone == batched
    model = session.model
    for r, answer in zip(reqs, batched):
        assert len(answer) == 12  # no stop ids: every answer runs to max_new_tokens
        model.set_adapter(r.adapter)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([r.prompt_ids + answer])).logits[0]
        start = len(r.prompt_ids) - 1
        for j, token in enumerate(answer):
            assert _margin_ok(logits[start + j], token), (family, r.adapter, j)


# --------------------------------------------------------------------------- LoRA targets per family

PRESET_TARGETS = {
    # family: (all-linear, attention, mlp) as the model's own layer names
    "phi3": (["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], ["qkv_proj", "o_proj"], ["gate_up_proj", "down_proj"]),
    "qwen3_moe": (["q_proj", "k_proj", "v_proj", "o_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], []),
}
LLAMA_SHAPED = (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"])


@pytest.mark.parametrize("family", FAMILIES)
def test_presets_name_each_familys_own_layers_never_the_head_or_router(family, family_dirs):
    from lorakit.model.lora import targets

    model, _ = load_model(ModelConfig(name=str(family_dirs(family)), dtype="fp32"), training=False)
    for preset, want in zip(("all-linear", "attention", "mlp"), PRESET_TARGETS.get(family, LLAMA_SHAPED)):
        if not want:  # a mixture of experts without lora.experts has no MLP linear to adapt
            with pytest.raises(Exception, match="names no layer"):
                targets(model, LoraConfig(target_modules=preset))
            continue
        chosen = targets(model, LoraConfig(target_modules=preset))
        assert sorted(chosen.modules) == sorted(want), (family, preset)
        assert "lm_head" not in chosen.modules and "gate" not in chosen.modules
    adapted = apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    names = [n for n, m in adapted.named_modules() if hasattr(m, "lora_A")]
    assert names and not any(n.endswith(("lm_head", ".gate", ".router")) or ".experts" in n for n in names)


def test_a_mixture_of_experts_adapts_its_experts_only_when_asked_and_its_router_never(family_dirs):
    from lorakit.model.lora import targets

    said: list[str] = []
    model, _ = load_model(ModelConfig(name=str(family_dirs("qwen3_moe")), dtype="fp32"), training=True)
    chosen = targets(model, LoraConfig(target_modules="all-linear"))
    text = chosen.describe("all-linear")
    assert "router model.layers.*.mlp.gate (never adapted)" in text
    assert "expert tensors model.layers.*.mlp.experts.gate_up_proj (lora.experts: true adapts them)" in text
    with pytest.raises(Exception, match="set lora.dropout: 0"):
        targets(model, LoraConfig(target_modules="all-linear", experts=True, dropout=0.05))
    with_experts = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear", experts=True),
                              log=said.append)
    assert "expert tensors: experts.gate_up_proj, experts.down_proj" in said[0]
    lora = {n for n, p in with_experts.named_parameters() if p.requires_grad}
    assert any(".experts." in n for n in lora) and not any(".gate." in n and ".experts." not in n for n in lora)
    # the expert LoRAs train: a backward reaches them
    ids = torch.randint(3, with_experts.config.vocab_size, (1, 12))
    with_experts(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in with_experts.named_parameters() if p.requires_grad and ".experts." in n and "lora_B" in n)


def test_experts_on_a_dense_model_or_with_a_list_is_a_config_error(family_dirs):
    from lorakit.errors import ModelError
    from lorakit.model.lora import targets

    model, _ = load_model(ModelConfig(name=str(family_dirs("llama")), dtype="fp32"), training=False)
    with pytest.raises(ModelError, match="no experts' weights"):
        targets(model, LoraConfig(target_modules="all-linear", experts=True))
    with pytest.raises(ModelError, match="needs a preset"):
        targets(model, LoraConfig(target_modules=["q_proj"], experts=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_name_that_matches_nothing_lists_the_familys_linear_layers(family, family_dirs):
    from lorakit.errors import ModelError

    model, _ = load_model(ModelConfig(name=str(family_dirs(family)), dtype="fp32"), training=False)
    with pytest.raises(ModelError) as err:
        apply_lora(model, LoraConfig(target_modules=["query_key_value"]))
    for name in PRESET_TARGETS.get(family, LLAMA_SHAPED)[0]:
        assert name in str(err.value)


# --------------------------------------------------------------------------- merge and GGUF


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_keeps_the_logits_and_the_greedy_answers(family, family_dirs, tmp_path):
    """`lorakit merge` of an adapter on every linear layer: the merged model's logits equal base +
    adapter within merge's own fp32 tolerance, with identical greedy answers, and the adapter
    really moves the logits (so the parity says something)."""
    from conftest import make_adapter
    from transformers import AutoTokenizer

    from lorakit.merge import merge

    folder = family_dirs(family)
    tok = AutoTokenizer.from_pretrained(folder)
    # LoRA factors of std 0.05 make B·A about the size of the random base weights (std 0.02), as a
    # trained update is; far larger ones push fp32 rounding of W + B·A past merge's tolerance, which
    # assumes an update small beside W
    ad = make_adapter(folder, tok, tmp_path / "ad", seed=3, scale=0.05,
                      lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    report = merge(ad, tmp_path / "merged", log=lambda s: None)
    assert report.passed and report.parity.greedy_identical
    assert report.parity.max_abs_diff <= report.tolerance < report.adapter_effect


GGUF_BUILD = {"mistral": {"sliding_window": None}}
"""How the GGUF check builds a family where it differs from the other tests' tiny model: llama.cpp
runs Mistral without a sliding window (Mistral 7B v0.3, Nemo and Small ship none; v0.1's 4,096 is
ignored by llama.cpp), so a window the converter drops would be a difference of the test's making."""

TRAIN_STEPS = 80
"""Steps of training before the GGUF check. The check demands identical greedy tokens from an f16
file, and an untrained random model's logits over SmolLM2's 49,152 tokens are so flat that the two
best differ by less than f16's rounding at about 1 % of positions: a coin flip per model over the
check's 64 positions (seen: one flip in ten families). A few dozen steps on the tests' rows make the
distribution peaked, as any fine-tune's is, and the check means what it says."""


OWN_TOKENIZER = {"gemma2": "a sentencepiece tokenizer.model trained here", "phi3": "a sentencepiece tokenizer.model "
                 "trained here", "qwen2": "Qwen's own vocabulary"}
"""The GGUF cells whose model carries its family's own kind of tokenizer instead of SmolLM2's."""


@pytest.mark.parametrize("family", FAMILIES)
def test_the_export_warns_where_llama_cpp_drops_a_sliding_window(family, family_dirs):
    """Mistral's window is dropped by llama.cpp (so GGUF_BUILD builds the GGUF cell's model without
    one); Gemma's are kept; the export says so for the first, and nothing for the others."""
    import json

    from lorakit.export.gguf import window_warning

    config = json.loads((family_dirs(family) / "config.json").read_text())
    warning = window_warning(config)
    if family == "mistral":
        assert config["sliding_window"] and f"({config['sliding_window']} tokens)" in warning
    else:
        assert warning is None


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_export_answers_as_transformers_in_llama_cpp(family, tmp_path):
    """`lorakit export --gguf f16` of an adapter on the family's model, with a real kind of
    tokenizer (llama.cpp's converter knows only those: SmolLM2's, or the family's own, see
    OWN_TOKENIZER): converted by llama.cpp's converter, loaded by llama.cpp, and verified there
    (the same tokens, greedy tokens identical, log-probabilities within the f16 bound)."""
    from conftest import tiny_config
    from transformers import AutoTokenizer

    from lorakit.cli import main
    from lorakit.model.embedded import embedded_model_dir

    from family_tokenizers import own_tokenizer

    tok = own_tokenizer(family, tmp_path / "model") or AutoTokenizer.from_pretrained(embedded_model_dir())
    model = build_tiny_model(tmp_path / "model", family=family, tokenizer=tok, **GGUF_BUILD.get(family, {}))
    cfg = tiny_config(tmp_path, model, "ad", data={"template": "chatml"},
                      train={"max_steps": TRAIN_STEPS, "lr": 1e-2, "batch_size": 4},
                      lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
    from lorakit import config as config_mod
    from lorakit.train.run import train

    ad = train(config_mod.from_dict(cfg), log=lambda s: None, progress=False)
    code = main(["export", str(ad), "--gguf", "f16", "--max-drop", "-1", "--max-new-tokens", "8", "--imatrix", "off"])
    published = sorted(p.name for p in (ad / "export").glob("*.gguf")) if (ad / "export").is_dir() else []
    assert code == 0 and published == ["ad-f16.gguf"]
    import json

    verdict = json.loads((ad / "export" / "ad-f16.gguf.verify.json").read_text())
    assert verdict["passed"] is True and verdict["tokens_equal"] is True  # llama.cpp tokenizes as transformers
    assert verdict["greedy_identical"] == len(verdict["prompts"])


# --------------------------------------------------------------------------- resume, DPO, GRPO


def _adapter_tensors(run) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(family, family_dirs, tmp_path):
    """A run resumed from its step-2 checkpoint (adapter, optimizer, scheduler, RNG with LoRA
    dropout on, data position) ends with the uninterrupted run's adapter, on every family: what
    the checkpoint must hold does not depend on the architecture, what restoring it touches does
    (expert and fused layers, the fast path's patched modules)."""
    import shutil

    from lorakit import config as config_mod
    from lorakit.train.run import train
    from conftest import tiny_config

    cfg = config_mod.from_dict(tiny_config(tmp_path, family_dirs(family), "r", lora={"dropout": 0.1},
                                           train={"save_steps": 1, "save_total_limit": 10, "seed": 3}))
    run = train(cfg, log=lambda s: None, progress=False)
    want = _adapter_tensors(run)
    shutil.rmtree(run / "adapter")
    for ckpt in (run / "checkpoints").iterdir():
        if int(ckpt.name.rsplit("-", 1)[1]) > 2:
            shutil.rmtree(ckpt)
    train(cfg, resume=True, log=lambda s: None, progress=False)
    got = _adapter_tensors(run)
    assert got.keys() == want.keys() and want
    for k in want:  # the same float32 operations in the same order: equal but for accumulation order in BLAS
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-7), k


def _pairs(tmp_path):
    from conftest import ALPACA_ROWS, write_jsonl

    rows = [{"instruction": r["instruction"], "input": r["input"], "chosen": r["output"],
             "rejected": ALPACA_ROWS[(i + 1) % len(ALPACA_ROWS)]["output"]} for i, r in enumerate(ALPACA_ROWS)]
    return write_jsonl(tmp_path / "pairs.jsonl", rows * 2)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_dpo_step_starts_at_ln2_and_moves_the_adapter(family, family_dirs, tmp_path):
    """DPO on the family's model: at the first step the policy is the reference (the adapter starts
    at zero), so the loss is ln 2 whatever the data — which holds only if the reference's log-probs
    (eval mode, no adapter) equal the policy's (the training fast path, with it) on this
    architecture, to float32 rounding (see test_preference_train: 1e-3 absolute); then the step
    moves the adapter."""
    import json
    import math

    from lorakit import config as config_mod
    from lorakit.train.run import train
    from conftest import tiny_config

    cfg = config_mod.from_dict(tiny_config(tmp_path, family_dirs(family), "dpo",
                                           data={"train": [str(_pairs(tmp_path))], "max_length": 128},
                                           train={"method": "dpo", "max_steps": 2, "batch_size": 4}))
    run = train(cfg, log=lambda s: None, progress=False)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3) and all(math.isfinite(v) for v in losses)
    assert any(float(v.abs().max()) > 0 for k, v in _adapter_tensors(run).items() if "lora_B" in k)


GRPO_REWARD = '''
def longer(prompt, completion, **row):
    """More characters, more reward (bounded): varies across a group, so advantages are not zero."""
    return len(completion) / (1 + len(completion))
'''


@pytest.mark.parametrize("family", FAMILIES)
def test_a_grpo_step_samples_from_the_family_and_learns(family, family_dirs, tmp_path):
    """GRPO on the family's model: rollouts sampled by lorakit's decoder from the adapter being
    trained (soft-capping, sliding windows, experts), rewards by code, a step that moves the
    adapter; the logged rewards are the rollouts' own."""
    import json
    import math

    from lorakit import config as config_mod
    from lorakit.train.run import train
    from conftest import tiny_config

    (tmp_path / "reward.py").write_text(GRPO_REWARD, encoding="utf-8")
    cfg = config_mod.from_dict(tiny_config(
        tmp_path, family_dirs(family), "grpo", data={"val_fraction": 0.0, "max_length": 128},
        train={"method": "grpo", "max_steps": 2, "lr": 1e-2, "seed": 5},
        grpo={"prompts_per_step": 2, "generations": 4, "max_completion_tokens": 8, "temperature": 1.0,
              "rewards": [{"name": f"{tmp_path / 'reward.py'}:longer"}]}))
    run = train(cfg, log=lambda s: None, progress=False)
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) and 0 <= r["rewards/longer"] < 1 for r in steps)
    assert any(float(v.abs().max()) > 0 for k, v in _adapter_tensors(run).items() if "lora_B" in k)


# --------------------------------------------------------------------------- Ollama TEMPLATE per family

FAMILY_TEMPLATES = {
    # Chat templates of the shapes each family ships, written here (no family's tokenizer files are
    # installable offline): what a user training with data.template: model gets. Qwen3 and
    # Qwen3-MoE use lorakit's chatml, the Hermes shape their own template writes (theirs also drops
    # earlier turns' reasoning, which no prefix-stable mask can train on).
    # SmolLM2's own: ChatML with a default system header when a chat has none
    "llama": ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
              "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
              "{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    # Llama 3: header ids, content trimmed
    "llama3": ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
               " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    # Qwen2.5: ChatML, a default system message, Hermes tools, consecutive tool results in one user turn
    "qwen2": (
        "{%- if tools %}{{- '<|im_start|>system\\n' }}"
        "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
        "{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}"
        "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided "
        "with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
        "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
        "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
        "{%- else %}{%- if messages[0]['role'] == 'system' %}"
        "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
        "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
        "{%- for message in messages %}"
        "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
        "(message.role == 'assistant' and not message.tool_calls) %}"
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
        "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
        "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
        "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
        "{%- set tool_call = tool_call.function %}{%- endif %}"
        "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
        "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
        "{%- elif message.role == 'tool' %}"
        "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
        "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
        "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
        "{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"),
    # Gemma 2 / 3: turns of user and model, content trimmed, the system folded into the first user turn
    "gemma": ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\\n\\n' %}"
              "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
              "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
              "{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"),
    # Mistral v0.3: [INST] ... [/INST], the system message written into the last user turn
    "mistral": ("{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
                "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
                "{{- bos_token }}{%- for message in loop_messages %}"
                "{%- if message['role'] == 'user' %}{%- if loop.last and system_message is defined %}"
                "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
                "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
                "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
                "{%- endfor %}"),
    # Phi-3 / 3.5: <|role|> lines closed by <|end|>
    "phi3": ("{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
             "{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}{% elif message['role'] == 'user' %}"
             "{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}{% elif message['role'] == 'assistant' %}"
             "{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"),
    # OLMo 2: <|role|> lines, the answer ended by EOS, the last one without its newline
    "olmo2": ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
              "{{ '<|system|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'user' %}"
              "{{ '<|user|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'assistant' %}"
              "{% if not loop.last %}{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
              "{% else %}{{ '<|assistant|>\\n' + message['content'] + eos_token }}{% endif %}{% endif %}"
              "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}"),
}

TEMPLATE_OF = {"llama": "llama", "llama3": "llama3", "qwen2": "qwen2", "qwen3": "chatml", "gemma2": "gemma",
               "gemma3": "gemma", "mistral": "mistral", "phi3": "phi3", "olmo2": "olmo2", "qwen3_moe": "chatml"}

OLLAMA_REFUSED = {
    "llama3": "content trimmed: a Go template cannot trim",
    "gemma2": "the system message folded into the first user turn, content trimmed",
    "gemma3": "the system message folded into the first user turn, content trimmed",
    "mistral": "the system message written into the last user turn",
}
"""Families whose own template shape no Ollama TEMPLATE can reproduce: the export refuses them,
naming the template, and `data.template: chatml` exports (the family's cell says which)."""

OLLAMA_TOOLS = {"qwen2", "qwen3", "qwen3_moe"}
"""Families whose template writes tools in the Hermes layout: their TEMPLATE carries tools."""


@pytest.mark.parametrize("family", FAMILIES)
def test_the_ollama_template_renders_the_familys_chat_as_trained(family, family_dirs, go_render):
    """The family's template shape through `lorakit export --ollama`'s TEMPLATE and Go's
    text/template renders each conversation as training did (byte for byte; tool JSON as
    values, see test_export_ollama), or is refused before any work with the reason and the fix."""
    from test_export_ollama import CONVERSATIONS, TOOL_CONVERSATIONS, _json_values
    from transformers import AutoTokenizer

    from lorakit.data.templates import resolve_template
    from lorakit.errors import LorakitError
    from lorakit.export import ollama

    tok = AutoTokenizer.from_pretrained(family_dirs(family))
    kind = TEMPLATE_OF[family]
    template = resolve_template(kind if kind == "chatml" else FAMILY_TEMPLATES[kind], tok)
    if family in OLLAMA_REFUSED:
        with pytest.raises(LorakitError) as e:
            ollama.go_template(template)
        assert "depends on more than its role and its neighbour's" in e.value.message
        assert "data.template: chatml" in e.value.hint
        return
    source, texts = ollama.go_template(template), ollama.turn_texts(template)
    assert (texts.tools is not None) == (family in OLLAMA_TOOLS), texts.why_no_tools
    cases = [(source, None, m) for m in CONVERSATIONS.values()]
    want = [template.render(m, add_generation_prompt=True) for m in CONVERSATIONS.values()]
    if texts.tools is not None:
        cases += [(source, None, m, t) for m, t in TOOL_CONVERSATIONS.values()]
        want += [template.render(m, add_generation_prompt=True, tools=t) for m, t in TOOL_CONVERSATIONS.values()]
    got = go_render(cases)
    for case, text, expected in zip(cases, got, want):
        assert _json_values(text) == _json_values(expected), (family, case[2])
        if len(case) == 3:  # no tools: no JSON to normalise, byte for byte
            assert text == expected, (family, case[2])
