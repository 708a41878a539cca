"""An Ollama folder: the GGUF (merged, or base + ADAPTER) and a Modelfile whose TEMPLATE renders
exactly what training rendered.

Ollama renders a chat with a Go `text/template` that sees `.Messages` (each `.Role`, `.Content`;
system messages included, consecutive messages of one role merged with a blank line) and the
model's answer follows the rendered text (/api/generate sends its prompt as one user message, so
it takes the same path).  The Modelfile's SYSTEM becomes a system message when a
chat does not begin with one (lorakit adds data.system_prompt when a conversation has none at all:
the same for every conversation whose system message, if any, comes first).

The TEMPLATE is derived from the training `Template` by render-diff, the way the loss mask is:
rendering conversations of probe contents through `Template.render` splits the text into what a
template writes

    before the first message    open[role]
    between two messages        between[(previous role, role)]
    after the last message      close[role]   (end of turn + generation prompt)

and the Go template writes those texts around each `.Content`.  This model fits every template
whose text around a message depends only on its role and its neighbour's (alpaca, chatml,
SmolLM2's, most role-prefix/suffix templates, a fixed default system header included).  It is
checked on every conversation of up to four turns before it is written; a template it does not
fit (content trimmed or rewritten, turns numbered, roles counted) is refused, naming it.

Why here and not in templates.py: the derivation needs only the public `Template.render`, the
one truth about what training saw; the Go syntax and Ollama's message handling belong to the
Ollama export.

What Ollama cannot see: an Alpaca row's separate `input` (Ollama messages have only content;
lorakit renders it as an "### Input:" block, so in Ollama put it in the user message), and a
last assistant message is left open for Ollama to continue (prefill), as Ollama's own templates
do.  BOS: when the tokenizer adds one, lorakit adds it to the ids, not the text, and llama.cpp adds
it from the GGUF's add_bos_token; a BOS that the template itself writes is then left out of the
TEMPLATE, since llama.cpp would add a second one (lorakit's ids have one).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Any, NoReturn

from lorakit.artifacts import MODELFILE, OLLAMA_ADAPTER, OLLAMA_MODEL, atomic_dir
from lorakit.data.templates import Template
from lorakit.errors import LorakitError

ROLES = ("system", "user", "assistant")
MODEL_FILE, ADAPTER_FILE = OLLAMA_MODEL, OLLAMA_ADAPTER
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)*(:[A-Za-z0-9._-]+)?")


def _probe(i: int) -> str:
    return f"\u2063lorakit-ollama-{i}\u2063"  # content no template contains


@dataclasses.dataclass(frozen=True)
class TurnTexts:
    """What a template writes around message contents (see the module doc)."""

    open: dict[str, str]
    between: dict[tuple[str, str], str]
    close: dict[str, str]

    def render(self, messages: list[dict]) -> str:
        """What the Go template renders for these messages (the Python twin of `go_template`)."""
        out, prev = [], ""
        for m in messages:
            out.append(self.open.get(m["role"], "") if not prev else self.between.get((prev, m["role"]), ""))
            out.append(m["content"])
            prev = m["role"]
        out.append(self.close.get(prev, ""))
        return "".join(out)


def turn_texts(template: Template) -> TurnTexts:
    """Split `template`'s renders into open/between/close texts, and check they reproduce it.

    Rendered without the default system prompt: Ollama adds it as a message (Modelfile SYSTEM)."""
    bare = dataclasses.replace(template, system_prompt=None)
    open_, between, close = {}, {}, {}
    for role in ROLES:
        parts = _split(bare, [role])
        if parts:
            open_[role] = parts[0]
            if role != "assistant":
                close[role] = parts[1]
    for prev, role in itertools.permutations(ROLES, 2):
        parts = _split(bare, [prev, role])
        if parts:
            between[(prev, role)] = parts[1]
    texts = TurnTexts(open_, between, close)
    if "user" not in open_:
        _refuse(template, "it cannot render a conversation that begins with a user message")
    for roles in _conversations():
        messages = [{"role": r, "content": f"{_probe(i)} line\n two "} for i, r in enumerate(roles)]
        try:
            want = bare.render(messages, add_generation_prompt=True)
        except LorakitError:
            continue  # a conversation the template itself refuses (e.g. system after user)
        got = texts.render(messages)
        if got != want:
            _refuse(template, f"the text around a message depends on more than its role and its neighbour's "
                              f"(roles {'/'.join(roles)}: renders {want!r}, role-wise texts give {got!r})")
    return texts


def _split(template: Template, roles: list[str]) -> list[str] | None:
    """The texts around each probe content of `roles` rendered with the generation prompt, or None."""
    try:
        text = template.render([{"role": r, "content": _probe(i)} for i, r in enumerate(roles)],
                               add_generation_prompt=True)
    except LorakitError:
        return None
    parts = []
    for i in range(len(roles)):
        head, sep, text = text.partition(_probe(i))
        if not sep:
            return None  # the template dropped or rewrote the content: the check in turn_texts refuses it
        parts.append(head)
    return parts + [text]


def _conversations() -> list[tuple[str, ...]]:
    """Every role sequence of 1-4 messages without two of one role in a row (Ollama merges those),
    ending in a message the model answers."""
    out = []
    for n in range(1, 5):
        for roles in itertools.product(ROLES, repeat=n):
            if roles[-1] != "assistant" and all(a != b for a, b in zip(roles, roles[1:])):
                out.append(roles)
    return out


def _refuse(template: Template, why: str) -> NoReturn:
    raise LorakitError(
        f"template '{template.name}' cannot be written as an Ollama TEMPLATE: {why}",
        where="data.template",
        hint="train with data.template: chatml or alpaca (both export to Ollama), or export without --ollama "
        "and write the Modelfile TEMPLATE yourself",
    )


# --------------------------------------------------------------------------- Go template


def go_string(text: str) -> str:
    """`text` as a Go interpreted string literal of printable ASCII only: the Modelfile parser drops
    characters Go's strconv.IsPrint rejects, and escapes keep the TEMPLATE byte-exact."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif " " <= c <= "~":
            out.append(c)
        elif ord(c) <= 0xFFFF:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return '"' + "".join(out) + '"'


def _chain(cases: list[tuple[str, str]], indent: str = "") -> list[str]:
    """`{{- if C1 }}{{ "T1" }}` / `{{- else if C2 }}{{ "T2" }}` ... `{{- end }}`, one case a line."""
    if not cases:
        return []
    lines = []
    for i, (cond, text) in enumerate(cases):
        out = "{{ " + go_string(text) + " }}" if text else ""
        lines.append(indent + ("{{- if " if i == 0 else "{{- else if ") + cond + " }}" + out)
    return lines + [indent + "{{- end }}"]


def go_template(template: Template, add_bos: bool = False) -> str:
    """The Ollama TEMPLATE (Go text/template) that renders what `template` renders at generation.

    `add_bos`: the tokenizer adds BOS (so llama.cpp will), so a leading BOS text is dropped.
    Every literal is a Go string inside an action and every line starts with `{{-`, which trims the
    layout's newline and indent, so the output is exactly the derived texts."""
    t = turn_texts(template)
    if add_bos and template.bos_token:
        t.open.update({r: text.removeprefix(template.bos_token) for r, text in t.open.items()})
    return "\n".join([
        '{{- $prev := "" }}',
        "{{- range .Messages }}",
        '  {{- if eq $prev "" }}',
        *_chain([(f'eq .Role "{r}"', t.open[r]) for r in ROLES if r in t.open], "    "),
        "  {{- else }}",
        *_chain([(f'and (eq $prev "{p}") (eq .Role "{r}")', text) for (p, r), text in t.between.items()], "    "),
        "  {{- end }}",
        "  {{- .Content }}",
        "  {{- $prev = .Role }}",
        "{{- end }}",
        *_chain([(f'eq $prev "{r}"', t.close[r]) for r in ROLES if r in t.close]),
    ])


# --------------------------------------------------------------------------- Modelfile


def _quoted(text: str, what: str) -> str:
    """A Modelfile value as Ollama's parser reads it back: `\"\"\"...\"\"\"` keeps newlines and quotes;
    it has no escapes, so a value containing \"\"\" or a non-printable character cannot be written."""
    bad = next((c for c in text if not (c.isprintable() or c in "\n\t")), None)
    if '"""' in text or bad is not None:
        raise LorakitError(
            f"{what} {text!r} cannot be written in a Modelfile "
            + ("(it contains \"\"\")" if bad is None else f"(it contains the non-printable {bad!r})"),
            hint="Ollama's Modelfile has no escapes; change the text, or export without --ollama",
        )
    if '"' in text or "\n" in text or text != text.strip():
        return f'"""{text}"""'
    return f'"{text}"'


def stop_texts(template: Template, tokenizer: Any) -> list[str]:
    """The decoded text of each stop token (EOS, and the end-of-turn token when it differs)."""
    out = []
    for i in template.stop_token_ids(tokenizer):
        text = tokenizer.decode([i])
        if text and text not in out:
            out.append(text)
    return out


def modelfile_text(template: Template, tokenizer: Any, *, max_length: int, adapter: bool = False,
                   model_file: str = MODEL_FILE, adapter_file: str = ADAPTER_FILE) -> str:
    """The Modelfile: FROM (and ADAPTER), TEMPLATE, SYSTEM for a default system prompt, stops, num_ctx.

    num_ctx is the training length: the model never saw longer sequences."""
    lines = [f"# Written by lorakit: the TEMPLATE renders what training rendered (template '{template.name}').",
             f"FROM ./{model_file}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter_file}")
    add_bos = bool(getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None)
    lines.append(f'TEMPLATE """{go_template(template, add_bos)}"""')
    if template.system_prompt:
        lines.append(f"SYSTEM {_quoted(template.system_prompt, 'the system prompt (data.system_prompt)')}")
    for stop in stop_texts(template, tokenizer):
        lines.append(f"PARAMETER stop {_quoted(stop, 'the stop token')}")
    lines.append(f"PARAMETER num_ctx {int(max_length)}")
    return "\n".join(lines) + "\n"


def create_command(folder: str | Path, name: str) -> str:
    """The command that imports the folder into Ollama (Ollama itself is not installed here)."""
    return f"ollama create {shlex.quote(name)} -f {shlex.quote(str(Path(folder) / MODELFILE))}"


def write_ollama_folder(out_dir: str | Path, gguf_file: str | Path, template: Template, tokenizer: Any, *,
                        adapter_gguf: str | Path | None = None, max_length: int, name: str) -> Path:
    """Write `out_dir` (replacing it in one rename): model.gguf, adapter.gguf when given, Modelfile.

    `gguf_file` is the merged model, or the base when `adapter_gguf` is the LoRA GGUF.  The GGUFs are
    hard-linked when on the same file system (they are large and never rewritten), else copied."""
    if not _NAME.fullmatch(name):
        raise LorakitError(f"{name!r} is not an Ollama model name", where="--name",
                           hint="use letters, digits, '.', '_' and '-' (optionally namespace/ and :tag)")
    sources = {MODEL_FILE: Path(gguf_file)}
    if adapter_gguf is not None:
        sources[ADAPTER_FILE] = Path(adapter_gguf)
    for src in sources.values():
        if not src.is_file():
            raise LorakitError(f"no GGUF file at {src}", hint="write the GGUF export first (lorakit export --gguf)")
    text = modelfile_text(template, tokenizer, max_length=max_length, adapter=adapter_gguf is not None)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for dest, src in sources.items():
            try:
                os.link(src, tmp / dest)
            except OSError:
                shutil.copy2(src, tmp / dest)
        (tmp / MODELFILE).write_text(text, encoding="utf-8")
    return out_dir
