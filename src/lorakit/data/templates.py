"""One template object renders prompts and derives the loss mask, for every stage.

A `Template` is a Jinja chat template in Hugging Face conventions (`messages`,
`add_generation_prompt`, `bos_token`, `eos_token`).  It is stored in the adapter's
`lorakit.json` (`to_dict` / `from_dict`), so generation, eval, the server and the Ollama
export render exactly what training saw.

Masking is derived by render-diff, without knowing any template's markers: for each
assistant turn i,

    prompt_i = render(messages[:i], add_generation_prompt=True)
    full_i   = render(messages[:i+1])
    trained  = full_i[len(prompt_i):]        # the response plus the end-of-turn text

This needs the template to be prefix-stable (each longer render starts with the shorter
one), which is checked.  The labels come from these text spans, never from pad ids, so a
tokenizer whose pad token is its EOS (SmolLM2) still trains the EOS.

Spans are tokenized separately (add_special_tokens=False) and concatenated, so a token
never straddles the prompt/response boundary; `encode_prompt` tokenizes with the same
boundaries, so the prompt ids at generation equal the ids training saw before a response.

Whitespace after an end-of-turn special token (chatml's "\n" after <|im_end|>) is left
untrained: generation stops at that token, so the model never has to produce what follows.
If the last trained span does not contain the tokenizer's EOS, the EOS is appended as the
last, trained token of the sequence, so the model learns to stop.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import weakref
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lorakit.errors import ConfigError, DataError, ModelError

# The guide's format: "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}",
# the Input block only when `input` is non-empty; a system message first as plain text + blank line;
# EOS after every response so the model learns to stop; turns of a longer chat repeat the blocks.
ALPACA = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + '\\n\\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '### Instruction:\\n' + message['content'] + '\\n\\n' -}}"
    "{%- if message.get('input') -%}{{- '### Input:\\n' + message['input'] + '\\n\\n' -}}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}{{- '### Response:\\n' + message['content'] + eos_token -}}"
    "{%- if not loop.last -%}{{- '\\n\\n' -}}{%- endif -%}"
    "{%- else -%}{{- '### Input:\\n' + message['content'] + '\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"
)

# ChatML, with the Hermes conventions Qwen2.5/3 and most tool-tuned models use for tools: the
# functions as JSON lines inside <tools> in the system turn, each call as a JSON object inside
# <tool_call> tags in the assistant turn, each result inside <tool_response> in a user turn, and an
# assistant turn's reasoning first, inside <think>. A conversation without any of these renders
# exactly as plain ChatML.
CHATML = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call these functions (JSON Schema):\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nTo call one, answer with a JSON object per call inside <tool_call></tool_call> tags:\\n"
    "<tool_call>\\n{\"name\": <function name>, \"arguments\": <JSON object>}\\n</tool_call><|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if tools and loop.first and message['role'] == 'system' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if message.get('reasoning') -%}{{- '<think>\\n' + message['reasoning'] + '\\n</think>\\n\\n' -}}{%- endif -%}"
    "{{- message['content'] -}}"
    "{%- for call in message.get('tool_calls') or [] -%}"
    "{%- if message['content'] or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson)"
    " + '\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

BUILTIN = {"alpaca": ALPACA, "chatml": CHATML}
NAMES = ("auto", "alpaca", "chatml", "model")
_PROBE = "\u2063lorakit-probe\u2063"  # content no template contains, to find the end-of-turn text


@dataclass
class Template:
    """A chat template plus what it needs to render on its own (stored with the adapter)."""

    name: str
    """'alpaca', 'chatml', 'model' or 'custom'."""
    source: str
    """The Jinja chat template."""
    bos_token: str = ""
    eos_token: str = ""
    system_prompt: str | None = None
    """Prepended as a system message to every conversation that has none (data.system_prompt)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Template":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    # ----------------------------------------------------------------------- rendering

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None) -> str:
        return self._render(self._normalize(messages), add_generation_prompt, tools)

    def _normalize(self, messages: list[dict]) -> list[dict]:
        """Apply the system prompt, and fold alpaca's `input` into the content for templates without an Input block."""
        out = [dict(m) for m in messages]
        if self.system_prompt and not any(m["role"] == "system" for m in out):
            out.insert(0, {"role": "system", "content": self.system_prompt})
        if self.name != "alpaca":
            for m in out:
                extra = m.pop("input", None)
                if extra:
                    m["content"] = f"{m['content']}\n\n{extra}"
        return out

    def _render(self, messages: list[dict], add_generation_prompt: bool, tools: list | None = None) -> str:
        try:
            return _compile(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=self.bos_token, eos_token=self.eos_token,
                                                tools=tools or None)
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            raise DataError(
                f"template '{self.name}' cannot render this conversation: {type(e).__name__}: {e}",
                hint="the template may require alternating user/assistant turns or reject system messages; "
                "fix the row, or choose data.template: chatml or alpaca",
            ) from None

    def hf_chat_template(self, tokenizer: Any) -> str:
        """A Hugging Face chat template that renders what this template trains on, for outside
        engines: `apply_chat_template(messages, add_generation_prompt=True)` gives the token ids of
        `encode_prompt` (tests/test_artifacts.py checks every template kind).

        It adds, in Jinja, what `_normalize` and `_bos` add in Python: the default system message,
        alpaca's `input` folded into the user turn for templates without an Input block, and the
        BOS token when the tokenizer adds one that the template does not render."""
        pre = []
        if self.name != "alpaca":
            pre.append(
                "{%- set ns = namespace(msgs=[]) -%}{%- for m in messages -%}"
                "{%- if m.get('input') -%}{%- set ns.msgs = ns.msgs + [{'role': m['role'], "
                "'content': m['content'] + '\\n\\n' + m['input']}] -%}"
                "{%- else -%}{%- set ns.msgs = ns.msgs + [m] -%}{%- endif -%}{%- endfor -%}"
                "{%- set messages = ns.msgs -%}")
        if self.system_prompt:
            pre.append("{%- if not (messages | selectattr('role', 'equalto', 'system') | list) -%}"
                       "{%- set messages = [{'role': 'system', 'content': " + json.dumps(self.system_prompt)
                       + "}] + messages -%}{%- endif -%}")
        body = self.source
        if adds_bos(tokenizer):
            body = ("{%- set lorakit_body -%}" + body + "{%- endset -%}"
                    "{%- if not lorakit_body.startswith(bos_token) -%}{{- bos_token -}}{%- endif -%}"
                    "{{- lorakit_body -}}")
        return "".join(pre) + body

    # ----------------------------------------------------------------------- tokenizing

    def encode(self, tokenizer: Any, example: dict, train_on_inputs: bool = False) -> tuple[list[int], list[int]]:
        """Token ids and labels (-100 where untrained) of one Example."""
        eos = tokenizer.eos_token_id
        if "text" in example:
            ids = self._bos(tokenizer, example["text"]) + _tokenize(tokenizer, example["text"])
            ids += [eos] if eos is not None else []
            return ids, list(ids)
        messages = self._normalize(example["messages"])
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise DataError("no assistant turn: nothing to train on", hint="add an assistant turn")
        # Turns after the last response teach nothing and would only cost tokens.
        spans = self._spans(messages[: last + 1], tokenizer, tools=example.get("tools"))
        ids = self._bos(tokenizer, spans[0][0])
        labels = list(ids) if train_on_inputs else [-100] * len(ids)
        last_trained: list[int] = []
        for text, trained in spans:
            tokens = _tokenize(tokenizer, text)
            ids += tokens
            labels += tokens if (trained or train_on_inputs) else [-100] * len(tokens)
            if trained:
                last_trained = tokens
        if eos is not None and eos not in last_trained:
            ids.append(eos)
            labels.append(eos)
        return ids, labels

    def encode_prompt(self, tokenizer: Any, messages: list[dict], tools: list | None = None) -> list[int]:
        """The conversation plus an open assistant turn, with `encode`'s span boundaries."""
        spans = self._spans(self._normalize(messages), tokenizer, open_turn=True, tools=tools)
        ids = self._bos(tokenizer, spans[0][0] if spans else "")
        for text, _ in spans:
            ids += _tokenize(tokenizer, text)
        return ids

    def _spans(self, messages: list[dict], tokenizer: Any, open_turn: bool = False,
               tools: list | None = None) -> list[tuple[str, bool]]:
        """Split the rendered conversation into (text, trained) spans; adjacent untrained spans merge.
        An assistant turn is trained whole: its reasoning, text and tool calls; what comes between
        (the tools' descriptions, users, tool results) is not."""
        spans: list[tuple[str, bool]] = []

        def add(text: str, trained: bool) -> None:
            if not text:
                return
            if spans and spans[-1][1] == trained:
                spans[-1] = (spans[-1][0] + text, trained)
            else:
                spans.append((text, trained))

        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], True, tools)
            full = self._render(messages[: i + 1], False, tools)
            self._require_prefix(done, prompt)
            self._require_prefix(prompt, full)
            add(prompt[len(done):], False)
            trained, tail = _split_tail(full[len(prompt):], tokenizer)
            add(trained, True)
            add(tail, False)
            done = full
        if open_turn:
            prompt = self._render(messages, True, tools)
            self._require_prefix(done, prompt)
            add(prompt[len(done):], False)
        return spans

    def _require_prefix(self, shorter: str, longer: str) -> None:
        if longer.startswith(shorter):
            return
        at = next((i for i, (a, b) in enumerate(zip(shorter, longer)) if a != b), min(len(shorter), len(longer)))
        raise DataError(
            f"template '{self.name}' is not prefix-stable: rendering one more turn changed earlier text "
            f"at character {at} ({shorter[max(0, at - 20):at + 20]!r} became {longer[max(0, at - 20):at + 20]!r})",
            hint="loss masking needs every turn rendered the same whatever follows it (templates that rewrite "
            "earlier turns, e.g. strip reasoning, are not); use data.template: chatml or alpaca, or a custom "
            "Jinja template",
        )

    def _bos(self, tokenizer: Any, first_text: str) -> list[int]:
        """[bos] when the tokenizer adds one and the rendered text does not already begin with it."""
        if adds_bos(tokenizer) and not first_text.startswith(tokenizer.bos_token or ""):
            return [tokenizer.bos_token_id]
        return []

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """EOS, plus the end-of-turn token when the template closes turns with a different special token."""
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        eot = self._end_of_turn_id(tokenizer)
        if eot is not None and eot not in ids:
            ids.append(eot)
        return ids

    def _end_of_turn_id(self, tokenizer: Any) -> int | None:
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
        try:
            spans = self._spans(self._normalize(probe), tokenizer)
        except DataError:
            return None
        trained = next((text for text, is_trained in spans if is_trained), "")
        if _PROBE not in trained:
            return None
        tokens = _tokenize(tokenizer, trained.split(_PROBE, 1)[1])
        added = set(tokenizer.added_tokens_decoder)
        first_added = next((t for t in tokens if t in added), None)
        if first_added is not None:
            return first_added
        return tokens[0] if len(tokens) == 1 else None


def resolve_template(spec: str, tokenizer: Any, system_prompt: str | None = None) -> Template:
    """'auto' | 'alpaca' | 'chatml' | 'model' | a Jinja string (or a .jinja file) -> Template."""
    spec = spec or "auto"
    if spec == "auto":
        spec = "model" if _model_template(tokenizer) else "alpaca"
    if spec in BUILTIN:
        name, source = spec, BUILTIN[spec]
    elif spec == "model":
        name, source = "model", _model_template(tokenizer)
        if not source:
            raise ModelError(
                "data.template is 'model' but the tokenizer has no chat template",
                hint="set data.template to 'alpaca' (the guide's format), 'chatml', or a Jinja chat template string",
            )
    elif "{%" in spec or "{{" in spec:
        name, source = "custom", spec
    elif spec.endswith((".jinja", ".j2")) and Path(spec).is_file():
        name, source = "custom", Path(spec).read_text(encoding="utf-8")
    else:
        close = difflib.get_close_matches(spec, NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError([f"data.template: {spec!r} is not one of {', '.join(map(repr, NAMES))}, a Jinja chat "
                           f"template string (containing '{{%' or '{{{{') or a .jinja file{hint}"])
    try:
        _compile(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError([f"data.template: not valid Jinja at line {e.lineno}: {e.message}"]) from None
    return Template(name, source, tokenizer.bos_token or "", tokenizer.eos_token or "", system_prompt)


def _model_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the chat one is 'default'
        template = template.get("default")
    return template or None


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _split_tail(span: str, tokenizer: Any) -> tuple[str, str]:
    """Split trailing whitespace off a trained span when it follows a special token (see module doc)."""
    stripped = span.rstrip()
    if stripped == span:
        return span, ""
    specials = {t.content for t in tokenizer.added_tokens_decoder.values()} | {tokenizer.eos_token, tokenizer.bos_token}
    if any(s and stripped.endswith(s) for s in specials):
        return stripped, span[len(stripped):]
    return span, ""


# --------------------------------------------------------------------------- Jinja


class _GenerationTag(Extension):
    """Accept `{% generation %}...{% endgeneration %}` (used by some HF templates) as a plain block."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_passthrough"), [], [], body).set_lineno(lineno)

    def _passthrough(self, caller: Any) -> str:
        return caller()


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of an encoded text: its `add_bos_token`, or, where
    transformers 5 builds it from tokenizer.json and keeps no such flag (Gemma, Llama 3), its
    post-processor doing so. llama.cpp's converter reads the same, so training, lorakit's prompts
    and the GGUF agree on one BOS."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    if bool(getattr(tokenizer, "add_bos_token", False)):
        return True
    try:  # asked once per tokenizer: encode calls this for every row, and the answer cannot change
        return _ADDS_BOS[tokenizer]
    except (KeyError, TypeError):
        adds = tokenizer("x").input_ids[:1] == [bos_id]
    try:
        _ADDS_BOS[tokenizer] = adds
    except TypeError:  # a tokenizer that cannot be weakly referenced is asked every time
        pass
    return adds


_ADDS_BOS: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def engine_text(template: "Template", tokenizer: Any, messages: list[dict]) -> str:
    """The prompt as text for an engine that adds BOS itself when the tokenizer does (llama.cpp
    and Ollama, from the GGUF): without a BOS the template writes first, which such an engine
    would double (llama.cpp's chat code and lorakit's Ollama TEMPLATE drop it the same way)."""
    text = template.render(messages, add_generation_prompt=True)
    bos = template.bos_token
    return text[len(bos):] if bos and adds_bos(tokenizer) and text.startswith(bos) else text


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    """The same environment transformers uses for chat templates, so model templates render identically."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
