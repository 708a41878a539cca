"""End-to-end training on the tiny model: what is written, what moved, what stayed put."""

import json

import pytest
import torch

from lorakit import config
from lorakit.errors import LorakitError


def tiny_config(tmp_path, model_dir, data_file, *extra):
    return config.load(None, [
        f"--model.name={model_dir}", f"--data.train={data_file}", "--data.val_fraction=0.25",
        "--data.template=alpaca", "--data.max_length=128",
        "--lora.r=4", "--lora.alpha=8", "--lora.dropout=0",
        "--train.max_steps=4", "--train.batch_size=2", "--train.grad_accum=2", "--train.lr=1e-2",
        "--train.logging_steps=1", "--train.eval_steps=2", "--train.save_steps=2", "--train.save_total_limit=1",
        "--train.mixed_precision=no",  # exact fp32, so comparisons between runs are tight
        f"--output.dir={tmp_path / 'runs'}", "--output.name=tiny", *extra,
    ])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    from conftest import ALPACA_ROWS, write_jsonl
    from lorakit.train.run import train

    tmp = tmp_path_factory.mktemp("train")
    data = write_jsonl(tmp / "data.jsonl", ALPACA_ROWS)
    cfg = tiny_config(tmp, tiny_model_dir, data)
    return train(cfg, log=lambda s: None, progress=False), cfg


def test_run_folder_layout(trained_run):
    run_dir, _ = trained_run
    adapter = run_dir / "adapter"
    assert (run_dir / "config.yaml").is_file()
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not list(adapter.glob("*.bin")), "adapters are safetensors only"
    assert list((run_dir / "logs").rglob("events.out.tfevents*")), "TensorBoard events written"
    ckpts = sorted((run_dir / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in ckpts] == ["checkpoint-4"], "keep-last-1 keeps only the newest checkpoint"
    assert not list(run_dir.parent.glob(".adapter.tmp-*")), "no temporary folders left behind"


def test_lorakit_json_describes_the_adapter(trained_run):
    run_dir, cfg = trained_run
    meta = json.loads((run_dir / "adapter" / "lorakit.json").read_text())
    assert meta["template"]["name"] == "alpaca"
    assert len(meta["base_model"]["sha256"]) == 64
    assert len(meta["data"]["fingerprint"]) == 64
    assert meta["lora"]["r"] == 4
    assert {"torch", "transformers", "peft"} <= set(meta["versions"])
    m = meta["metrics"]
    assert m["steps"] == 4 and m["trained_tokens"] > 0 and m["trained_tokens_per_s"] > 0
    assert m["eval_loss_start"] is not None and m["eval_loss"] is not None


def test_metrics_jsonl_has_train_and_eval_records(trained_run):
    run_dir, _ = trained_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    eval_steps = [r["step"] for r in records if "eval_loss" in r]
    assert train_steps == [1, 2, 3, 4]
    assert eval_steps == [0, 2, 4]  # before training, then every 2 steps
    assert all(r["trained_tokens_per_s"] > 0 for r in records if "loss" in r)
    assert all("learning_rate" in r and "grad_norm" in r for r in records if "loss" in r)


def test_lora_moved_and_base_did_not(trained_run, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run_dir, _ = trained_run
    lora = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    b_weights = [v for k, v in lora.items() if "lora_B" in k]
    assert b_weights and all(v.abs().sum() > 0 for v in b_weights), "B starts at zero; training must move it"

    from lorakit.infer import load_session

    session = load_session(run_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_sd = base.state_dict()
    seen = 0
    for name, tensor in session.model.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(tensor, base_sd[key]), f"base weight {key} changed"
        seen += 1
    assert seen >= 10


def test_adapter_reloads_with_plain_peft(trained_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorakit.infer import load_session

    run_dir, _ = trained_run
    session = load_session(run_dir)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(run_dir / "adapter"))
    plain.eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        ours = session.model(input_ids=ids).logits
        theirs = plain(input_ids=ids).logits
        with session.model.disable_adapter():
            base = session.model(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert not torch.allclose(ours, base, atol=1e-4), "the adapter must change the logits"


def test_generate_uses_stored_template_and_streams(trained_run):
    from lorakit.infer import Sampling, generate, load_session, messages_from_instruction

    run_dir, _ = trained_run
    session = load_session(run_dir)
    pieces = []
    msgs = messages_from_instruction("Say hello.")
    done = generate(session, msgs, Sampling(max_new_tokens=8, greedy=True), stream=pieces.append)
    assert "".join(pieces).strip() == done.text
    again = generate(session, msgs, Sampling(max_new_tokens=8, greedy=True))
    assert again == done, "greedy decoding is deterministic (text, ids, counts, finish reason)"
    prompt_ids = session.template.encode_prompt(session.tokenizer, msgs)
    assert session.tokenizer.decode(prompt_ids).endswith("### Response:\n")


def test_existing_run_folder_is_not_overwritten(trained_run, tiny_model_dir, tmp_path):
    from lorakit.train.run import train

    run_dir, cfg = trained_run
    before = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(LorakitError, match="already exists"):
        train(cfg, log=lambda s: None, progress=False)
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_fast_loss_trains_like_the_stock_loss(tmp_path, tiny_model_dir, monkeypatch):
    """Same seed, grad accumulation 2: the labelled-only loss path ends at the stock path's adapter."""
    from safetensors.torch import load_file

    from conftest import ALPACA_ROWS, write_jsonl
    import lorakit.train.trainer as trainer_mod
    from lorakit.train.run import train

    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS)
    used = []
    real_split = trainer_mod.split_head

    def spy(model):
        out = real_split(model)
        used.append(out is not None)
        return out

    monkeypatch.setattr(trainer_mod, "split_head", spy)
    fast = train(tiny_config(tmp_path / "a", tiny_model_dir, data, "--train.eval_steps=0"),
                 log=lambda s: None, progress=False)
    monkeypatch.setattr(trainer_mod, "split_head", lambda model: None)
    slow = train(tiny_config(tmp_path / "b", tiny_model_dir, data, "--train.eval_steps=0"),
                 log=lambda s: None, progress=False)
    assert used == [True]
    a = load_file(fast / "adapter" / "adapter_model.safetensors")
    b = load_file(slow / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    # Tolerance. Both runs are fp32 with the same seed, data order and masks; the two losses differ
    # only in summation order (a sum over the labelled rows divided by the step's token count, against
    # the stock mean over all positions scaled by accumulation), so each gradient differs by a few fp32
    # ulps (relative ~1e-7 to 1e-6). AdamW's step m/(sqrt(v)+eps) is scale-free, so a relative gradient
    # error becomes the same relative step error: over 4 steps of lr 1e-2 that is far below 1e-5 for
    # every element whose gradient is not itself ~eps, where the direction is noise for both paths.
    # Measured 2026-12-02: max |a - b| = 9.1e-6 (the elementwise bound below is used to 11%), while
    # training moved the weights by up to 2.0e-2; ||a - b|| / ||moved|| = 6.6e-5. A real difference in
    # the loss (a wrong position, a missing token, a wrong divisor) moves the result by the same order
    # as training itself, which the norm-ratio bound of 1e-3 catches.
    init = train(tiny_config(tmp_path / "c", tiny_model_dir, data, "--train.eval_steps=0", "--train.max_steps=1",
                             "--train.lr=1e-30"), log=lambda s: None, progress=False)
    c = load_file(init / "adapter" / "adapter_model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5), k
        moved = float((b[k] - c[k]).norm())
        assert moved > 0 and float((a[k] - b[k]).norm()) < 1e-3 * moved, k


def test_batched_generation_matches_one_at_a_time(trained_run):
    from lorakit.infer import Sampling, generate, generate_batch, load_session, messages_from_instruction

    run_dir, _ = trained_run
    session = load_session(run_dir)
    convs = [messages_from_instruction("Say hello."),
             messages_from_instruction("Explain the return policy to a customer.", "Can I return an item after 45 days?")]
    s = Sampling(max_new_tokens=6, greedy=True)
    for use_adapter in (True, False):
        batched = generate_batch(session, convs, s, use_adapter=use_adapter)
        single = [generate(session, c, s, use_adapter=use_adapter) for c in convs]
        assert batched == single


def test_bf16_autocast_on_cpu_keeps_fp32_adapter(tmp_path, tiny_model_dir, monkeypatch):
    """mixed_precision bf16 autocasts the loss computation; LoRA weights and their saved copy stay fp32."""
    from safetensors.torch import load_file

    import lorakit.train.trainer as trainer_mod
    from conftest import ALPACA_ROWS, write_jsonl
    from lorakit.train.run import train

    seen = []
    real = trainer_mod.labelled_loss

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "labelled_loss", spy)
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS)
    cfg = tiny_config(tmp_path, tiny_model_dir, data, "--train.mixed_precision=bf16", "--train.max_steps=2",
                      "--train.eval_steps=0", "--train.save_steps=0")
    run = train(cfg, log=lambda s: None, progress=False)
    assert seen and all(seen), "every training step ran under bf16 autocast"
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert weights and all(v.dtype == torch.float32 for v in weights.values())
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


def test_fp16_autocast_without_gpu_is_a_clear_error(tmp_path, tiny_model_dir):
    from conftest import ALPACA_ROWS, write_jsonl
    from lorakit.train.run import train

    if torch.cuda.is_available():
        pytest.skip("fp16 autocast is valid on a GPU")
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS)
    with pytest.raises(LorakitError, match="fp16 needs a CUDA GPU"):
        train(tiny_config(tmp_path, tiny_model_dir, data, "--train.mixed_precision=fp16"), log=lambda s: None,
              progress=False)


def test_folder_of_a_failed_run_is_reused(tmp_path, tiny_model_dir):
    from conftest import ALPACA_ROWS, write_jsonl
    from lorakit.train.run import train

    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS)
    cfg = tiny_config(tmp_path, tiny_model_dir, data, "--train.max_steps=1", "--train.eval_steps=0",
                      "--train.save_steps=0")
    leftover = cfg.run_dir
    leftover.mkdir(parents=True)
    (leftover / "config.yaml").write_text("stale")
    run = train(cfg, log=lambda s: None, progress=False)
    assert (run / "adapter" / "lorakit.json").is_file()
    assert (run / "config.yaml").read_text() != "stale"


def test_packed_run_matches_padded_run(tmp_path, tiny_model_dir):
    """Whole training runs with and without packing reach the same adapter and losses (fp32, same seed)."""
    from safetensors.torch import load_file

    from conftest import ALPACA_ROWS, write_jsonl
    from lorakit.train.run import train

    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS)
    runs = {}
    for packing in ("true", "false"):
        cfg = tiny_config(tmp_path / packing, tiny_model_dir, data, f"--data.packing={packing}")
        runs[packing] = train(cfg, log=lambda s: None, progress=False)
    a = load_file(runs["true"] / "adapter" / "adapter_model.safetensors")
    b = load_file(runs["false"] / "adapter" / "adapter_model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5), k
    ma = json.loads((runs["true"] / "adapter" / "lorakit.json").read_text())["metrics"]
    mb = json.loads((runs["false"] / "adapter" / "lorakit.json").read_text())["metrics"]
    assert ma["eval_loss"] == pytest.approx(mb["eval_loss"], rel=1e-4)
    assert ma["trained_tokens"] == mb["trained_tokens"]


def test_failed_overwrite_keeps_the_previous_run(trained_run, tmp_path, monkeypatch):
    """--output.overwrite with a run that dies before its first checkpoint: the old run is back, byte for byte."""
    from transformers import Trainer

    from lorakit.train.run import train

    run_dir, cfg = trained_run
    before = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()

    def dies(self, *a, **k):
        raise RuntimeError("simulated crash in the first step")

    monkeypatch.setattr(Trainer, "train", dies)
    cfg.output.overwrite = True
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            train(cfg, log=lambda s: None, progress=False)
    finally:
        cfg.output.overwrite = False
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert not list(run_dir.parent.glob(".tiny.replaced-*"))


def test_bad_data_never_touches_an_existing_run(trained_run, tmp_path):
    from lorakit.errors import DataError
    from lorakit.train.run import train

    run_dir, cfg = trained_run
    listing = sorted(p.name for p in run_dir.rglob("*"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": 3}\n')
    broken = config.load(None, [f"--model.name={cfg.model.name}", f"--data.train={bad}",
                                f"--output.dir={cfg.output.dir}", "--output.name=tiny", "--output.overwrite=true"])
    with pytest.raises(DataError, match="bad.jsonl line 1"):
        train(broken, log=lambda s: None, progress=False)
    assert sorted(p.name for p in run_dir.rglob("*")) == listing


def test_auto_hyperparameters_resolve_from_the_guides_table(tmp_path, tiny_model_dir):
    """16 rows is a small dataset: r 8, alpha 16, dropout 0.1, lr 1e-4 — written into the run's config."""
    import yaml

    from conftest import ALPACA_ROWS, write_jsonl
    from lorakit.train.run import train

    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS)
    cfg = tiny_config(tmp_path, tiny_model_dir, data, "--lora.r=auto", "--lora.alpha=auto", "--lora.dropout=auto",
                      "--train.lr=auto", "--train.max_steps=1", "--train.eval_steps=0", "--train.save_steps=0")
    said = []
    run = train(cfg, log=said.append, progress=False)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["lora"]["r"], saved["lora"]["alpha"], saved["lora"]["dropout"], saved["train"]["lr"]) == \
        (8, 16, 0.1, 1e-4)
    assert any("lora.r: auto" in s for s in said)
