"""A family's own kind of tokenizer, built offline, for the GGUF checks of tests/test_families.py.

llama.cpp's converter (convert_hf_to_gguf.py) reads a model's vocabulary the way the family ships
it, and refuses others:

- Gemma 2 and Phi-3 (`Gemma2Model.set_vocab`, `Phi3MiniModel.set_vocab`) read a sentencepiece
  `tokenizer.model` and nothing else (Gemma 2 raises FileNotFoundError without one, Phi-3
  `ValueError: Error: Missing .../tokenizer.model`). Both families ship a sentencepiece BPE model
  with byte fallback, so one trained here with the `sentencepiece` package on local text is the
  family's own kind of tokenizer, only with a small vocabulary: the converter reads it as it reads
  Gemma's or Phi-3's, and llama.cpp tokenizes with it as with theirs (its SPM tokenizer).
- Qwen2 has none here: see `own_tokenizer`.

Vocabulary sizes are small (about 1,000 tokens: 256 byte pieces, the specials and the merges the
text supports), so the tiny models built over them stay tiny; the model's vocabulary is
`len(tokenizer)`, as for every tokenizer `build_tiny_model` is given.
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
    split, ids <pad>=0, <eos>=1, <bos>=2, <unk>=3, <mask>=4 as Gemma has them, and <start_of_turn>,
    <end_of_turn> as pieces of the model (user-defined, as in Gemma's); a GemmaTokenizer (fast,
    transformers' conversion of that tokenizer.model) with Gemma's chat template."""
    from transformers import GemmaTokenizer

    _train_sentencepiece(folder, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
                         bos_piece="<bos>", unk_piece="<unk>", add_dummy_prefix=False,
                         control_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"])
    tok = GemmaTokenizer.from_pretrained(folder, add_bos_token=True)  # Gemma starts every text with <bos>
    tok.chat_template = GEMMA_CHAT
    return tok


def phi3_tokenizer(folder: Path):
    """Phi-3's kind of tokenizer: Llama's sentencepiece BPE with byte fallback and a dummy prefix,
    ids <unk>=0, <s>=1, </s>=2, <s> added in front of every text (as Llama's LlamaTokenizer does),
    then Phi-3's chat tokens added after the sentencepiece vocabulary as special tokens with
    Phi-3's flags: <|endoftext|> as it is, <|assistant|>, <|system|>, <|end|>, <|user|> eating the
    whitespace after them (rstrip); EOS and PAD <|endoftext|> as Phi-3 has them; a LlamaTokenizer
    (fast) with Phi-3's chat template. transformers loads a Phi-3 model's tokenizer from this
    tokenizer.json as it is (TokenizersBackend), the converter reads tokenizer.model and the added
    tokens of tokenizer.json (`Phi3MiniModel.set_vocab`)."""
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    _train_sentencepiece(folder, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True)
    tok = LlamaTokenizer.from_pretrained(folder, legacy=False, add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, normalized=False, rstrip=t != "<|endoftext|>") for t in PHI3_ADDED]})
    tok.eos_token = tok.pad_token = "<|endoftext|>"
    tok.chat_template = PHI3_CHAT
    return tok


def own_tokenizer(family: str, folder: Path):
    """The family's own kind of tokenizer, trained offline, with its tokenizer.model written into
    `folder` (the model folder: pass the same folder to `build_tiny_model`), or None for a family
    whose converter accepts a tokenizer the tests already have (SmolLM2's).

    Raises LookupError for qwen2: llama.cpp's converter takes a Qwen2 vocabulary either from a
    sentencepiece tokenizer.model, which transformers never reads for a Qwen2 model (it always
    builds Qwen2Tokenizer, byte-level BPE with Qwen's pre-tokenizer), so the two would tokenize
    differently; or as byte-level BPE whose pre-tokenizer it recognises by hashing the token ids
    of a fixed text, and it knows Qwen2's pre-tokenizer only with Qwen's own 151,643-token
    vocabulary (any other vocabulary hashes differently), which nothing installed here ships."""
    folder = Path(folder)
    if family in ("gemma2",):
        return gemma_tokenizer(folder)
    if family == "phi3":
        return phi3_tokenizer(folder)
    if family == "qwen2":
        raise LookupError("qwen2: llama.cpp recognises Qwen2's pre-tokenizer only with Qwen's own vocabulary")
    return None
