"""A family's own kind of tokenizer, built offline, for the GGUF checks of tests/test_families.py.

llama.cpp's converter (convert_hf_to_gguf.py) reads a model's vocabulary the way the family ships
it, and refuses others:

- Gemma 2 and Phi-3 (`Gemma2Model.set_vocab`, `Phi3MiniModel.set_vocab`) read a sentencepiece
  `tokenizer.model` and nothing else (Gemma 2 raises FileNotFoundError without one, Phi-3
  `ValueError: Error: Missing .../tokenizer.model`). Both families ship a sentencepiece BPE model
  with byte fallback, so one trained here with the `sentencepiece` package on local text is the
  family's own kind of tokenizer, only with a small vocabulary: the converter reads it as it reads
  Gemma's or Phi-3's, and llama.cpp tokenizes with it as with theirs (its SPM tokenizer).
- Qwen2: transformers always builds Qwen2Tokenizer for a Qwen2 model (byte-level BPE with Qwen's
  pre-tokenizer regex, whatever tokenizer_class the folder names), and the converter accepts a
  byte-level BPE vocabulary only when it recognises its pre-tokenizer by the hash of the ids it
  gives a fixed text. With SmolLM2's vocabulary that hash is unknown (a70b913f...: "BPE
  pre-tokenizer was not recognized"); with Qwen's own vocabulary it is the one llama.cpp lists
  for Qwen1.5 ("qwen2"). Qwen's vocabulary is shipped by the `dashscope` package (Apache-2.0).

The sentencepiece vocabularies are small (1,000 pieces: 256 byte pieces, the specials and the
merges the text supports), so those tiny models stay tiny; Qwen2's is Qwen's 151,646 tokens. The
model's vocabulary is `len(tokenizer)`, as for every tokenizer `build_tiny_model` is given.

These checks found two lorakit bugs, fixed where they were: transformers 5 saves a tokenizer as
tokenizer.json only, so the merged folder lorakit converts had no tokenizer.model
(`artifacts.meta.save_tokenizer` now copies the base's); and transformers 5 drops
`add_bos_token` when it loads a tokenizer.json (the BOS comes from the post-processor), so
lorakit's prompts missed the BOS Gemma and Phi-3 add and llama.cpp adds too
(`data.templates.adds_bos` now asks the tokenizer).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

VOCAB = 1000
"""Pieces in each trained sentencepiece model (byte pieces and specials included)."""

GEMMA_CHAT = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
"""Gemma 2's chat template (without its system-role refusal): turns in <start_of_turn> ... <end_of_turn>."""

PHI3_CHAT = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
"""Phi-3's chat template: <|user|> / <|assistant|> turns closed by <|end|>."""

PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
"""Phi-3's added tokens after the sentencepiece vocabulary, in Phi-3's order (Phi-3 numbers them
32000, 32001, 32006, 32007, 32010 with placeholders between; here they follow one another)."""


def corpus() -> list[str]:
    """The text the sentencepiece models are trained on: the tests' own sentences and rows, and
    the demo data lorakit ships (about 100 kB of English customer-support text), so the pieces
    are words the tests' rows are made of. Everything is local."""
    import lorakit
    from conftest import ALPACA_ROWS, CORPUS

    texts = list(CORPUS)
    for row in ALPACA_ROWS:
        texts.extend(str(v) for v in row.values() if v)
    for path in sorted((Path(lorakit.__file__).parent / "demo" / "data").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.extend(str(v) for v in json.loads(line).values() if isinstance(v, str) and v)
    return texts


def _train_sentencepiece(folder: Path, **options) -> Path:
    """Train a sentencepiece BPE model with byte fallback on `corpus()` into folder/tokenizer.model.

    Deterministic: one thread, no sampling of the input, so every run writes the same model."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, model_type="bpe", vocab_size=VOCAB,
        byte_fallback=True, split_digits=True, character_coverage=1.0, remove_extra_whitespaces=False,
        normalization_rule_name="identity", num_threads=1, input_sentence_size=0, minloglevel=2, **options)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def gemma_tokenizer(folder: Path):
    """Gemma's kind of tokenizer: sentencepiece BPE with byte fallback, no dummy prefix, digits
    split, ids <pad>=0, <eos>=1, <bos>=2, <unk>=3, <mask>=4 as Gemma has them, <bos> in front of
    every text, and <start_of_turn>, <end_of_turn> as control pieces (special tokens to
    transformers and to llama.cpp alike); a GemmaTokenizer (fast, transformers' conversion of that
    tokenizer.model) with Gemma's chat template."""
    from transformers import GemmaTokenizer

    _train_sentencepiece(folder, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
                         bos_piece="<bos>", unk_piece="<unk>", add_dummy_prefix=False,
                         control_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"])
    tok = GemmaTokenizer.from_pretrained(folder, add_bos_token=True)  # Gemma starts every text with <bos>
    tok.chat_template = GEMMA_CHAT
    return tok


def phi3_tokenizer(folder: Path):
    """Phi-3's kind of tokenizer: Llama's sentencepiece BPE with byte fallback and a dummy prefix,
    ids <unk>=0, <s>=1, </s>=2, <s> in front of every text; then Phi-3's chat tokens added after
    the sentencepiece vocabulary as special tokens with Phi-3's flags: <|endoftext|> as it is,
    <|assistant|>, <|system|>, <|end|>, <|user|> eating the whitespace after them (rstrip); EOS
    and PAD <|endoftext|>, and Phi-3's chat template.

    The tokenizer.json pipeline is the one Llama 2 and Phi-3 ship (normalizer: prepend "▁", then
    spaces to "▁"; no pre-tokenizer), not transformers 5's LlamaTokenizer rebuild (a Metaspace
    pre-tokenizer, which adds no "▁" to a text that starts with a space, nor after a special
    token, where sentencepiece and llama.cpp do). transformers loads a Phi-3 model's tokenizer from
    tokenizer.json as it is (TokenizersBackend: phi3 is in its MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS);
    the converter reads tokenizer.model plus tokenizer.json's added tokens (`Phi3MiniModel.set_vocab`)."""
    from tokenizers import AddedToken, decoders, normalizers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    _train_sentencepiece(folder, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True)
    backend = LlamaTokenizer.from_pretrained(folder).backend_tokenizer  # vocab + merges of tokenizer.model
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>", add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, normalized=False, rstrip=t != "<|endoftext|>") for t in PHI3_ADDED]})
    tok.eos_token = tok.pad_token = "<|endoftext|>"
    tok.chat_template = PHI3_CHAT
    return tok


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
"""Qwen2's special tokens, numbered from 151,643 after the 151,643 byte-level BPE tokens."""

QWEN_CHAT = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""Qwen2-Instruct's chat template (ChatML with its default system message)."""


def qwen_ranks() -> dict[bytes, int]:
    """Qwen's byte-level BPE ranks (token bytes -> id; 151,643 of them) as the `dashscope` package
    ships them (dashscope/resources/qwen.tiktoken, Apache-2.0: Alibaba's own SDK, which counts
    Qwen tokens offline with it). It is the vocabulary of Qwen, Qwen1.5 and Qwen2/2.5. Raises
    LookupError when dashscope is not installed."""
    import base64
    import importlib.util

    spec = importlib.util.find_spec("dashscope")  # found, not imported (its __init__ pulls in aiohttp)
    path = next((Path(p) / "resources" / "qwen.tiktoken" for p in (spec.submodule_search_locations or [])), None) \
        if spec else None
    if path is None or not path.is_file():
        raise LookupError("Qwen's vocabulary (qwen.tiktoken) comes from the dashscope package, which is not installed")
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bpe_split(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The merge that makes `token`: byte-level BPE of its bytes with the merges ranked before it
    leaves exactly two parts (the way Qwen's merges.txt and llama.cpp's `QwenModel.bpe` derive it)."""
    rank, parts = ranks[token], [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best[1]):
                best = (i, r)
        if best is None:
            break
        i = best[0]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    assert len(parts) == 2, (token, parts)
    return parts[0], parts[1]


def qwen2_tokenizer(folder: Path):
    """Qwen2's own tokenizer: Qwen's 151,643-token byte-level BPE (`qwen_ranks`) with its merges
    derived from the ranks, its three special tokens, EOS <|im_end|> and PAD <|endoftext|> (no
    BOS), as Qwen2-Instruct ships them, and its chat template; a Qwen2Tokenizer, which is what
    transformers builds for a Qwen2 model whatever tokenizer_class the folder names.

    llama.cpp's converter reads a Qwen2 vocabulary as byte-level BPE (there is no tokenizer.model)
    and recognises its pre-tokenizer by hashing the ids transformers gives a fixed text: this
    tokenizer hashes to the one it lists for Qwen1.5-7B ("qwen2", e636dc30...), as Qwen's own does.
    No smaller vocabulary can do that honestly (any other vocabulary gives other ids, so another
    hash): the tiny model's embedding has 151,646 rows."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = qwen_ranks()
    byte_char = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[text(token)] = rank
        if len(token) > 1:
            merges.append(tuple(map(text, _bpe_split(ranks, token))))
    for i, special in enumerate(QWEN_SPECIALS):
        vocab[special] = len(ranks) + i
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", errors="replace")
    tok.chat_template = QWEN_CHAT
    return tok


def own_tokenizer(family: str, folder: Path):
    """The family's own kind of tokenizer, built offline, with its tokenizer.model (where it has
    one) written into `folder` (the model folder: pass the same folder to `build_tiny_model`), or
    None for a family whose converter accepts a tokenizer the tests already have (SmolLM2's).

    gemma2 and phi3: a sentencepiece model trained here (`gemma_tokenizer`, `phi3_tokenizer`).
    qwen2: Qwen's own vocabulary from the dashscope package (`qwen2_tokenizer`; LookupError
    without it): llama.cpp's converter would read a tokenizer.model for Qwen2 too, but
    transformers never does for a Qwen2 model (it always builds Qwen2Tokenizer, byte-level BPE
    with Qwen's pre-tokenizer), so the two would tokenize differently."""
    folder = Path(folder)
    if family == "gemma2":
        return gemma_tokenizer(folder)
    if family == "phi3":
        return phi3_tokenizer(folder)
    if family == "qwen2":
        return qwen2_tokenizer(folder)
    return None
