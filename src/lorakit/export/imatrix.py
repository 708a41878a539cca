"""Importance matrices (llama.cpp's "imatrix"), collected in transformers on a run's own data.

`llama-quantize --imatrix` weights each weight's rounding error by how strongly its input column
is driven.  For a weight W (rows i, input columns j) fed activations x_t (t = token), the output
error of quantizing W to Q is  sum_t ((W - Q) x_t)_i^2  ~  sum_j (W - Q)_ij^2 * E[x_j^2]
(cross terms dropped), so the quantizer minimises  sum_j w_j (W_ij - Q_ij)^2  with
w_j = E_t[x_tj^2] = (sum_t x_tj^2) / (number of tokens).  llama.cpp's `llama-imatrix` measures
w_j by running the GGUF model over a text file; `collect` measures the same numbers with
forward hooks on the transformers model before conversion, so the data can be the run's own
training rows rendered with the trained template (`chunks_for_run`), optionally mixed with
general text so the quantized model keeps what the adapter did not touch.

What is matched, in the vendored llama.cpp's tools/imatrix/imatrix.cpp:

- which products are counted (collect_imatrix, 245-252): every dense matmul whose weight is named
  `blk.*`, plus `output.weight` only with --process-output; none with fewer than 16 token rows
  (`src1->ne[1] < 16`).  A tied lm_head is `token_embd.weight` in the GGUF, neither `blk.*` nor
  `output.weight`, so it is never recorded;
- what is accumulated (385-397, 408): per input column j, sum over token rows of x_tj^2,
  and one count per tensor, += the number of token rows;
- how text is chunked (compute_imatrix, 804, 832, 866-893): the whole file tokenized once, BOS
  first when the vocabulary adds one, special-token text not parsed; n_ctx-token chunks, the
  first token of each replaced by BOS, the remainder dropped; positions 0..n_ctx-1, one
  sequence per chunk (attention never crosses chunks);
- what is saved (save_imatrix, 583-628): general.type = "imatrix", imatrix.datasets,
  imatrix.chunk_count (u32, max count // chunk_size: m_last_chunk, 409-413), imatrix.chunk_size (u32),
  then per tensor in sorted name order `<name>.in_sum2` (f32, ne = (n, n_mat)) and
  `<name>.counts` (f32, ne = (1, n_mat)), 1-D when n_mat = 1 (gguf.cpp writes ggml_n_dims);
- what llama-quantize uses (tools/quantize/quantize.cpp load_imatrix, 197-211):
  float(sum_j) / float(count), in float32, or 1 where a count is 0.  `Imatrix.vectors()` does
  exactly that, so `rewrite_gguf(imatrix=m.vectors())` and `llama-quantize --imatrix FILE` see
  the same numbers.

The GGUF name of a transformers module is gguf-py's `TensorNameMap` for the exported
architecture (the converter's own table).  The converter permutes the rows of q/k for its
rotary layout; rows are output features, and the statistics are per INPUT column, so the
permutation does not touch them.
"""

from __future__ import annotations

import contextlib

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from lorakit.errors import LorakitError

MIN_TOKENS = 16
"""llama-imatrix ignores a matmul over fewer token rows (imatrix.cpp:249); `collect` skips a chunk
that short, as llama-imatrix would skip it decoded on its own."""

PACK_TOKENS = 512
"""Tokens per forward pass of `collect`: enough rows for full-speed matrix products, few enough
that the block-diagonal attention over the packed row (quadratic in it) stays a small part."""

OUTPUT = "output.weight"

GgufNames = str | Mapping[str, str] | Callable[[str], str | None]
"""The GGUF general.architecture (names from gguf-py's table), or module name -> GGUF tensor name."""


# --------------------------------------------------------------------------- the matrix


@dataclass
class Imatrix:
    """Per GGUF tensor: sums of squared inputs per input column, and how many token rows.

    `sums[name]` is float64 of shape (n_mat, n) (n_mat = 1 for a dense weight, n_expert for a
    merged MoE tensor read from llama-imatrix), `counts[name]` int64 of shape (n_mat,).  Sums are
    kept in float64 because they grow with every token: a float32 running sum of N positive
    terms carries a relative rounding error up to ~N * 2^-24 (0.6 % at 100k tokens), and once
    the sum is 2^24 times a term, that term is lost entirely.  x^2 of a float32 is exact in
    float64 (a 48-bit product), so here the only rounding is the float64 summation."""

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    chunk_count: int
    chunk_size: int
    datasets: list[str] = field(default_factory=list)

    def vectors(self) -> dict[str, np.ndarray]:
        """{GGUF tensor name: float32 importance per input column (n_mat * n values)}, computed as
        llama-quantize computes it from the saved file: float32(sum) / float32(count), or 1 for
        an expert with no tokens (quantize.cpp:197-211)."""
        out = {}
        for name, sums in self.sums.items():
            s = sums.astype(np.float32)
            c = self.counts[name].astype(np.float32)[:, None]
            out[name] = np.where(c > 0, s / np.where(c > 0, c, np.float32(1)), np.float32(1)).reshape(-1)
        return out

    def write(self, path: str | Path) -> Path:
        """Write llama.cpp's GGUF imatrix format, as imatrix.cpp's save_imatrix writes it.

        Atomic and with the umask's mode, as every exported file (lorakit.artifacts.atomic_file)."""
        import gguf

        from lorakit.artifacts import atomic_file

        if not self.datasets:
            raise ValueError("name the data the matrix was collected on (Imatrix.datasets)")
        path = Path(path)
        K = gguf.Keys.IMatrix
        with atomic_file(path) as tmp:
            writer = _imatrix_writer(tmp)
            writer.add_type(gguf.GGUFType.IMATRIX)
            writer.add_key_value(K.DATASETS, list(self.datasets), gguf.GGUFValueType.ARRAY,
                                 sub_type=gguf.GGUFValueType.STRING)
            writer.add_uint32(K.CHUNK_COUNT, int(self.chunk_count))
            writer.add_uint32(K.CHUNK_SIZE, int(self.chunk_size))
            for name in sorted(self.sums):  # std::sort over std::string: byte order = code point order
                sums, counts = self.sums[name], self.counts[name]
                n_mat = len(counts)
                # numpy shape = reversed ggml ne; ggml_n_dims drops a trailing ne of 1
                writer.add_tensor(f"{name}.in_sum2", sums.astype(np.float32).reshape(sums.shape if n_mat > 1 else -1))
                writer.add_tensor(f"{name}.counts", counts.astype(np.float32).reshape((n_mat, 1) if n_mat > 1 else 1))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        return path


def _imatrix_writer(path: Path):
    """A GGUFWriter that writes no general.architecture: an imatrix file has none (imatrix.cpp
    save_imatrix sets only general.type and the imatrix.* keys)."""
    import gguf

    class Writer(gguf.GGUFWriter):
        def add_architecture(self) -> None:
            pass

    return Writer(path, arch="")


def read(path: str | Path) -> Imatrix:
    """An imatrix GGUF file (ours or llama-imatrix's) as an `Imatrix`; counts rounded as
    llama.cpp's loader rounds them (lround of the stored float, common/imatrix-loader.cpp:166)."""
    import gguf

    path = Path(path)
    where = str(path)
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise LorakitError(f"not a GGUF imatrix file: {e}", where=where,
                           hint="convert a legacy .dat with `llama-imatrix --in-file X.dat -o X.gguf`") from None
    K = gguf.Keys.IMatrix

    def value(key: str, default):
        f = reader.get_field(key)
        return f.contents() if f is not None else default

    tensors = {t.name: t for t in reader.tensors}
    sums, counts = {}, {}
    for tname, t in tensors.items():
        if not tname.endswith(".in_sum2"):
            continue
        name = tname[: -len(".in_sum2")]
        c = tensors.get(f"{name}.counts")
        if c is None:
            raise LorakitError(f"{tname} has no {name}.counts", where=where, hint="re-create the imatrix file")
        n_mat = int(c.n_elements)
        counts[name] = np.floor(np.asarray(c.data, np.float64).reshape(-1) + 0.5).astype(np.int64)  # lround, >= 0
        sums[name] = np.asarray(t.data, np.float32).astype(np.float64).reshape(n_mat, -1)
    if not sums:
        raise LorakitError("no <tensor>.in_sum2 entries: not an importance matrix", where=where,
                           hint="pass a file written by `llama-imatrix` or lorakit")
    return Imatrix(sums, counts, int(value(K.CHUNK_COUNT, 0)), int(value(K.CHUNK_SIZE, 0)),
                   list(value(K.DATASETS, [])))


# --------------------------------------------------------------------------- names


def tensor_names(model, arch: str) -> dict[str, str]:
    """{module name: GGUF tensor name} for every `nn.Linear` of `model` that gguf-py's
    `TensorNameMap` for `arch` (the GGUF general.architecture: "llama", "olmo2", "qwen2", ...)
    names; the same table llama.cpp's converter renames tensors with."""
    import gguf
    import torch

    archs = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in archs:
        raise LorakitError(f"gguf-py does not know the architecture {arch!r}",
                           hint="pass the general.architecture of the converted GGUF file")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    tmap = gguf.get_tensor_name_map(archs[arch], int(config.num_hidden_layers))
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (gname := tmap.get_name(name)) is not None:
            out[name] = f"{gname}.weight"
    return out


def _recorded(model, gguf_names: GgufNames, process_output: bool) -> dict[str, str]:
    """The modules llama-imatrix would record, by GGUF name: `blk.*` weights, plus an untied
    `output.weight` with `process_output`.  A GGUF name two modules claim is left out: the
    converter must have combined them, and how is not known here."""
    import torch

    if isinstance(gguf_names, str):
        gguf_names = tensor_names(model, gguf_names)
    lookup = gguf_names.get if isinstance(gguf_names, Mapping) else gguf_names
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    chosen: dict[str, str] = {}
    claimed: dict[str, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or (gname := lookup(name)) is None:
            continue
        tied = embed is not None and module.weight.data_ptr() == embed.weight.data_ptr()
        if gname.startswith("blk.") or (process_output and gname == OUTPUT and not tied):
            chosen[name] = gname
            claimed[gname] = claimed.get(gname, 0) + 1
    return {m: g for m, g in chosen.items() if claimed[g] == 1}


# --------------------------------------------------------------------------- collecting


def collect(model, chunks: Iterable[Sequence[int]], *, gguf_names: GgufNames, datasets: Sequence[str] = (),
            chunk_size: int | None = None, process_output: bool = False, min_tokens: int = MIN_TOKENS,
            pack_tokens: int | None = PACK_TOKENS, log: Callable[[str], None] | None = None) -> Imatrix:
    """Run `model` (a transformers causal LM) over `chunks` of token ids, each chunk its own
    sequence, and accumulate per recorded `nn.Linear`:  sums[j] += sum_t x_tj^2  and
    count += T  for its input x of T token rows.

    Chunks are packed into forward passes of up to `pack_tokens` tokens (first-fit decreasing,
    `lorakit.data.collate.pack_bins`), one after another in a batch of one with positions
    restarting at 0 for each and no attention mask: transformers then builds a block-diagonal
    causal mask (the mechanism lorakit's padding-free training uses, tests/test_packing.py), so
    each chunk is computed as if alone, at its own positions, and no padding enters the sums.
    Packing only gives the matrix products enough rows to run at speed (on CPU a 90-row GEMM
    runs ~5x slower per row than a 512-row one).  `pack_tokens` None: one chunk per pass.

    `gguf_names` is the GGUF architecture name (names via `tensor_names`), or a mapping or
    function from module name to GGUF tensor name.  `chunk_size` (default: the longest chunk)
    is the file's imatrix.chunk_size; chunk_count = tokens // chunk_size, as llama-imatrix
    counts it.  Chunks shorter than `min_tokens` are skipped, as llama-imatrix skips them.

    The model runs in eval mode under no_grad (and is put back in its mode); the hooks are
    removed afterwards whatever happens, so the model computes exactly what it did before."""
    import inspect
    import time

    import torch

    from lorakit.data.collate import pack_bins

    recorded = _recorded(model, gguf_names, process_output)
    if not recorded:
        raise LorakitError("no linear layer of the model has a blk.* GGUF name",
                           hint="pass the GGUF general.architecture of this model's conversion")
    # only the last position's logits are needed unless lm_head itself is recorded
    kwargs = {"use_cache": False}
    accepts = inspect.signature(model.forward).parameters
    if OUTPUT not in recorded.values() and "logits_to_keep" in accepts:
        kwargs["logits_to_keep"] = 1
    given = [list(c) for c in chunks]
    kept = [c for c in given if len(c) >= min_tokens]
    if not kept:
        raise LorakitError(f"no chunk of at least {min_tokens} tokens to collect the importance matrix on",
                           hint="give more (or longer) rows or a general-text file")
    lengths = [len(c) for c in kept]
    passes = pack_bins(lengths, pack_tokens) if pack_tokens and "position_ids" in accepts else \
        [[i] for i in range(len(kept))]
    sums = _SquareSums(model, recorded)
    start = time.perf_counter()
    with sums.recording(), torch.no_grad():
        device = next(model.parameters()).device
        for group in passes:
            ids = torch.tensor([[t for i in group for t in kept[i]]], dtype=torch.long, device=device)
            positions = torch.tensor([[p for i in group for p in range(lengths[i])]], device=device)
            packed = {"position_ids": positions} if len(group) > 1 else {}  # only where accepted
            model(input_ids=ids, **packed, **kwargs)
    out, counts = sums.result()
    chunk_size = chunk_size or max(lengths)
    tokens = max(counts.values())
    if log:
        log(f"importance matrix: {len(out)} tensors over {len(kept)} chunks ({tokens} tokens, {len(passes)} passes"
            + (f", {len(given) - len(kept)} chunks under {min_tokens} tokens skipped" if len(given) > len(kept) else "")
            + f") in {time.perf_counter() - start:.1f} s")
    return Imatrix(out, {g: np.array([c], dtype=np.int64) for g, c in counts.items()}, tokens // chunk_size,
                   chunk_size, list(datasets))


class _SquareSums:
    """Per recorded linear (module name -> GGUF name): the float64 sum of x^2 per input column and
    the count of rows, gathered by forward pre-hooks while `recording`."""

    def __init__(self, model, recorded: dict[str, str]):
        import torch

        self.model, self.recorded = model, recorded
        device = next(model.parameters()).device
        self.device = torch.device("cpu") if device.type == "mps" else device  # MPS has no float64
        self.modules = dict(model.named_modules())
        self.sums = {g: torch.zeros(self.modules[m].in_features, dtype=torch.float64, device=self.device)
                     for m, g in recorded.items()}
        self.counts = dict.fromkeys(recorded.values(), 0)

    def _hook(self, gname: str):
        def pre(_module, args):
            import torch

            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(self.device, torch.float64)
            self.sums[gname] += (x * x).sum(0)
            self.counts[gname] += x.shape[0]
        return pre

    @contextlib.contextmanager
    def recording(self):
        """The model in eval mode with the hooks on; afterwards the hooks are gone and the mode is
        back, whatever happened, so the model computes exactly what it did before."""
        handles = [self.modules[m].register_forward_pre_hook(self._hook(g)) for m, g in self.recorded.items()]
        was_training = self.model.training
        try:
            self.model.eval()
            yield self
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        out = {g: s.cpu().numpy()[None, :] for g, s in self.sums.items()}
        for g, s in out.items():
            if not np.isfinite(s).all():
                raise LorakitError(f"non-finite activations entering {g}", hint="the model overflows on this data; "
                                   "check the merged weights (lorakit merge prints a parity check)")
        return out, self.counts


# --------------------------------------------------------------------------- what to collect on


def text_chunks(tokenizer, text: str, n_ctx: int, *, add_bos: bool | None = None) -> list[list[int]]:
    """`text` cut into chunks as llama-imatrix cuts its file (imatrix.cpp compute_imatrix):
    tokenized once, special-token text taken literally (its default, no --parse-special), BOS
    prepended when the vocabulary adds one, then n_ctx-token chunks whose first token is
    replaced by BOS, the incomplete last chunk dropped.

    `add_bos` is the GGUF's tokenizer.ggml.add_bos_token; by default, whether `tokenizer` puts
    a BOS in front of an encoded text (what the converter derives it from)."""
    from lorakit.data.templates import adds_bos

    bos = tokenizer.bos_token_id
    if add_bos is None:
        add_bos = adds_bos(tokenizer)
    if add_bos and bos is None:
        raise LorakitError("add_bos is set but the tokenizer has no BOS token", hint="pass add_bos=False")
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False).input_ids
    tokens = [bos] + ids if add_bos else ids
    chunks = [tokens[i * n_ctx:(i + 1) * n_ctx] for i in range(len(tokens) // n_ctx)]
    return [[bos] + c[1:] for c in chunks] if add_bos else chunks


@dataclass
class Calibration:
    """What `collect` runs on for a run: token chunks, the names of their sources (the file's
    imatrix.datasets) and the chunk size (imatrix.chunk_size)."""

    chunks: list[list[int]]
    datasets: list[str]
    chunk_size: int
    rows: int = 0  # training rows among the chunks
    text_chunks: int = 0  # general-text chunks among them

    @property
    def tokens(self) -> int:
        return sum(len(c) for c in self.chunks)


def chunks_for_run(run: str | Path, tokenizer=None, *, max_rows: int = 256, max_tokens: int = 65536,
                   text: str | Path | None = None, text_tokens: int | None = None, n_ctx: int = 512,
                   add_bos: bool | None = None, log: Callable[[str], None] = print) -> Calibration:
    """The run's training rows rendered with its trained template (re-made by `prepare` from
    the run's config.yaml and checked against the adapter's data fingerprint), plus, from the
    plain-text file `text`, general text chunked as llama-imatrix chunks it.

    Rows: up to `max_rows` drawn at random (seeded by train.seed, so the matrix is
    reproducible) and kept in file order, until `max_tokens`.  Each row is its own chunk, as
    long as it is, at positions from 0 and attending only to itself: the statistics are then
    those of the model's real use, one conversation per context.  Concatenating rows into
    n_ctx chunks (what llama-imatrix would make of them in a text file) would let later rows
    attend to earlier, unrelated ones at positions they never take in use; it gives the same
    numbers only with per-row positions and a block-diagonal mask, which is how `collect`
    packs chunks into its forward passes.

    Text: up to `text_tokens` (default: as many tokens as the rows gave, so the mean
    importance is an even mix; every token weighs the same in it) in n_ctx chunks."""
    from lorakit import config as config_mod
    from lorakit.artifacts import RunPaths, find_adapter_dir, read_meta
    from lorakit.data.preference import answers, prepare_method

    adapter_dir = find_adapter_dir(run)
    paths, meta = RunPaths.of(adapter_dir), read_meta(adapter_dir)
    if not paths.config.is_file():
        raise LorakitError(f"no config.yaml in {paths.root}: the run's training data is unknown",
                           hint="point at a run folder made by `lorakit train` (runs/<name>)")
    cfg = config_mod.load(paths.config)
    if tokenizer is None:
        from lorakit.model.load import load_tokenizer

        tokenizer = load_tokenizer(meta.base.model_config())
    prepared = prepare_method(cfg, tokenizer)
    if prepared.fingerprint != meta.data.fingerprint:
        log("warning: the training data changed since this run (fingerprint differs): the importance matrix is "
            "collected on the data as it is now")
    items = answers(prepared, "train")[0]  # a preference run: its chosen answers, the text it was pulled toward
    picked = sorted(random.Random(cfg.train.seed).sample(range(len(items)), min(max_rows, len(items))))
    chunks: list[list[int]] = []
    row_tokens = 0
    for i in picked:
        ids = list(items[i]["input_ids"])
        if chunks and row_tokens + len(ids) > max_tokens:
            break
        chunks.append(ids)
        row_tokens += len(ids)
    datasets = list(cfg.data.train)  # file names, as llama-imatrix records its text file
    n_rows, n_text = len(chunks), 0
    if text is not None:
        text = Path(text)
        try:
            body = text.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LorakitError(f"cannot read the general-text file: {e}", where=str(text),
                               hint="pass a UTF-8 plain-text file") from None
        general = text_chunks(tokenizer, body, n_ctx, add_bos=add_bos)
        if not general:
            raise LorakitError(f"the general-text file holds fewer than n_ctx = {n_ctx} tokens", where=str(text),
                               hint="pass a longer file or a smaller n_ctx")
        budget = row_tokens if text_tokens is None else text_tokens
        n_text = max(1, min(len(general), math.ceil(budget / n_ctx)))
        chunks += general[:n_text]
        datasets.append(str(text))
    return Calibration(chunks, datasets, n_ctx, n_rows, n_text)


__all__ = ["Calibration", "Imatrix", "MIN_TOKENS", "chunks_for_run", "collect", "read", "tensor_names", "text_chunks"]
