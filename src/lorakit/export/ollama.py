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

Tools and reasoning are derived the same way, with probe tools, calls and reasoning: a template
that writes them in the Hermes layout (lorakit's `chatml`; see `ToolTexts`) gets a TEMPLATE that
uses `.Tools`, `.ToolCalls`, tool results and `.Thinking`, so Ollama offers the tools and thinking
capabilities and finds the call tag (`<tool_call>`) and the thinking tags in it, and reads the
model's calls back.  The one difference from training: Ollama hands the TEMPLATE tool descriptions
and call arguments as compact JSON (Go's encoding), where training wrote json.dumps' spaced form.
A template whose tools do not fit gets a TEMPLATE without tools (`TurnTexts.why_no_tools`).

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
import json
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Any, NoReturn

from lorakit.artifacts import MODELFILE, OLLAMA_ADAPTER, OLLAMA_MODEL, atomic_dir
from lorakit.data.templates import Template, adds_bos
from lorakit.errors import LorakitError

ROLES = ("system", "user", "assistant")
TOOL = "tool"
MODEL_FILE, ADAPTER_FILE = OLLAMA_MODEL, OLLAMA_ADAPTER
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)*(:[A-Za-z0-9._-]+)?")


def _probe(i: int) -> str:
    return f"\u2063lorakit-ollama-{i}\u2063"  # content no template contains


def _dumps(value: Any) -> str:
    """JSON as lorakit's templates write it (the `tojson` filter: json.dumps, non-ASCII kept)."""
    return json.dumps(value, ensure_ascii=False)


def _probe_tool(i: int) -> dict:
    return {"type": "function", "function": {"name": f"probe_{i}", "description": _probe(100 + i),
                                             "parameters": {"type": "object", "properties": {}}}}


def _probe_call(i: int) -> dict:
    return {"type": "function", "function": {"name": f"probe_{i}", "arguments": {"arg": _probe(200 + i)}}}


def _call_json(call: dict, dumps=_dumps) -> str:
    """A call as the Hermes convention writes it, {"name": ..., "arguments": {...}}, its arguments
    written by `dumps` (with json.dumps, the call is json.dumps of that object)."""
    fn = call["function"]
    return f'{{"name": {_dumps(fn["name"])}, "arguments": {dumps(fn.get("arguments") or {})}}}'


@dataclasses.dataclass(frozen=True)
class ToolTexts:
    """What a template writes around the tools' descriptions and an assistant turn's calls.

    With tools, the tools block comes first, holding a leading system message's content:

        [sys_head SYSTEM sys_tail | head] TOOL (sep TOOL)*   then the messages, the system one skipped,
        the first of them opened by first[role] (the rest of the tools block and that message's open text)

    and an assistant turn's calls follow its content:  [call_sep] call_open CALL (call_between CALL)* call_close"""

    head: str
    sys_head: str
    sys_tail: str
    sep: str
    first: dict[str, str]
    call_sep: str
    call_open: str
    call_between: str
    call_close: str


@dataclasses.dataclass(frozen=True)
class TurnTexts:
    """What a template writes around message contents (see the module doc)."""

    open: dict[str, str]
    between: dict[tuple[str, str], str]
    close: dict[str, str]
    tools: ToolTexts | None = None
    """None: the TEMPLATE renders no tools (why_no_tools says why)."""
    think: tuple[str, str] | None = None
    """The texts around an assistant turn's reasoning, when the template renders it."""
    why_no_tools: str = ""

    def render(self, messages: list[dict], tools: list | None = None, dumps=_dumps) -> str:
        """What the Go template renders for these messages (the Python twin of `go_template`).

        `dumps` writes a tool description and a call's arguments: json.dumps is what training
        wrote; Ollama writes them compact (Go's encoding/json), the one difference between the two."""
        out, prev = [], ""
        t = self.tools if tools else None
        if t is not None:
            if messages and messages[0]["role"] == "system":
                out += [t.sys_head, messages[0]["content"], t.sys_tail]
            else:
                out.append(t.head)
            out.append(t.sep.join(dumps(tool) for tool in tools))
        for i, m in enumerate(messages):
            if t is not None and i == 0 and m["role"] == "system":
                continue
            opening = t.first if t is not None else self.open
            out.append(opening.get(m["role"], "") if not prev else self.between.get((prev, m["role"]), ""))
            if self.think and m["role"] == "assistant" and m.get("reasoning"):
                out += [self.think[0], m["reasoning"], self.think[1]]
            out.append(m["content"])
            calls = m.get("tool_calls") if self.tools is not None and m["role"] == "assistant" else None
            if calls:  # with or without tools in this request, as a template writes a history's calls
                ct = self.tools
                if m["content"]:
                    out.append(ct.call_sep)
                out.append(ct.call_open)
                out.append(ct.call_between.join(_call_json(c, dumps) for c in calls))
                out.append(ct.call_close)
            prev = m["role"]
        out.append(self.close.get(prev, ""))
        return "".join(out)


def turn_texts(template: Template) -> TurnTexts:
    """Split `template`'s renders into open/between/close texts, and check they reproduce it; with
    the texts around reasoning, and around tools, calls and tool results where the template writes
    them in the Hermes layout (`ToolTexts`; otherwise the TEMPLATE renders no tools, and
    `why_no_tools` says why).

    Rendered without the default system prompt: Ollama adds it as a message (Modelfile SYSTEM)."""
    bare = dataclasses.replace(template, system_prompt=None)
    texts = _role_texts(bare, ROLES)
    if "user" not in texts.open:
        _refuse(template, "it cannot render a conversation that begins with a user message")
    bad = _mismatch(bare, texts, ROLES)
    if bad:
        _refuse(template, f"the text around a message depends on more than its role and its neighbour's ({bad})")
    texts = dataclasses.replace(texts, think=_think_texts(bare, texts))
    try:
        with_results = _role_texts(bare, ROLES + (TOOL,))
        if TOOL not in with_results.open or _mismatch(bare, with_results, ROLES + (TOOL,)):
            raise _NoTools("renders no tool results, or renders them depending on more than their neighbours")
        with_results = dataclasses.replace(with_results, think=texts.think)
        tools = _tool_texts(bare, with_results)
        _check_tools(bare, dataclasses.replace(with_results, tools=tools))
    except _NoTools as e:
        return dataclasses.replace(texts, why_no_tools=f"template '{template.name}' {e}")
    return dataclasses.replace(with_results, tools=tools)


def _role_texts(bare: Template, roles: tuple[str, ...]) -> TurnTexts:
    open_, between, close = {}, {}, {}
    for role in roles:
        parts = _split(bare, [role])
        if parts:
            open_[role] = parts[0]
            if role != "assistant":
                close[role] = parts[1]
    for prev, role in itertools.product(roles, repeat=2):
        if prev == role and role != TOOL:  # Ollama merges consecutive messages of one role, except tool results
            continue
        parts = _split(bare, [prev, role])
        if parts:
            between[(prev, role)] = parts[1]
    return TurnTexts(open_, between, close)


def _mismatch(bare: Template, texts: TurnTexts, roles: tuple[str, ...]) -> str:
    """The first conversation of probe contents the role-wise texts do not reproduce, described."""
    for seq in _conversations(roles):
        messages = [{"role": r, "content": f"{_probe(i)} line\n two "} for i, r in enumerate(seq)]
        try:
            want = bare.render(messages, add_generation_prompt=True)
        except LorakitError:
            continue  # a conversation the template itself refuses (e.g. system after user)
        got = texts.render(messages)
        if got != want:
            return f"roles {'/'.join(seq)}: renders {want!r}, role-wise texts give {got!r}"
    return ""


class _NoTools(Exception):
    """The template's tool texts do not fit the TEMPLATE's layout (the TEMPLATE then renders no tools)."""


def _between(text: str, start: str, end: str, what: str) -> str:
    """The text between `start` and the next `end` in `text`."""
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if j < 0:
        raise _NoTools(f"does not write {what} where the Hermes layout has it")
    return text[i + len(start):j]


def _tool_texts(bare: Template, texts: TurnTexts) -> ToolTexts:
    t0, t1 = (_probe_tool(i) for i in range(2))
    user, system = {"role": "user", "content": _probe(0)}, {"role": "system", "content": _probe(1)}

    def render(messages, tools=None):
        try:
            return bare.render(messages, add_generation_prompt=True, tools=tools)
        except LorakitError as e:
            raise _NoTools(f"cannot render a conversation with tools ({e.message})") from None

    one = render([user], [t0])
    if t0["function"]["name"] not in one:
        raise _NoTools("does not render the tools it is given")
    if _dumps(t0) not in one:
        raise _NoTools("writes the tools' descriptions in a form other than one JSON object each")
    head = one[:one.index(_dumps(t0))]
    sep = _between(render([user], [t0, t1]), _dumps(t0), _dumps(t1), "two tools in a row")
    with_system = render([system, user], [t0])
    sys_head = with_system[:with_system.find(_probe(1))] if _probe(1) in with_system else ""
    sys_tail = _between(with_system, _probe(1), _dumps(t0), "a system message before the tools")
    first = {}
    for role in ("user", "assistant", TOOL):
        msg = {"role": role, "content": _probe(0)}
        try:
            alone, after_system = (bare.render(m, add_generation_prompt=True, tools=[t0]) for m in ([msg], [system, msg]))
        except LorakitError:
            continue
        if _dumps(t0) in alone and _probe(0) in alone:
            first[role] = _between(alone, _dumps(t0), _probe(0), "a message after the tools")
            if _between(after_system, _dumps(t0), _probe(0), "a message after the tools") != first[role]:
                raise _NoTools("writes the tools block differently with a system message and without")
    if "user" not in first:
        raise _NoTools("does not write a user message after the tools")
    c0, c1 = (_probe_call(i) for i in range(2))
    a = {"role": "assistant", "content": _probe(2), "tool_calls": [c0]}
    after_user = texts.between[("user", "assistant")]
    said = render([user, a, {"role": TOOL, "content": _probe(3)}])
    to_call = _between(said, _probe(0) + after_user + _probe(2), _call_json(c0), "a call after the text")
    bare_call = render([user, {**a, "content": ""}, {"role": TOOL, "content": _probe(3)}])
    call_open = _between(bare_call, _probe(0) + after_user, _call_json(c0), "a call without text")
    if not to_call.endswith(call_open):
        raise _NoTools("writes a call after text differently from a call alone")
    close = _between(said, _call_json(c0), _probe(3), "a tool result after a call")
    after = texts.between[("assistant", TOOL)]
    if not close.endswith(after):
        raise _NoTools("ends a turn with calls differently from a turn without")
    two = render([user, {**a, "tool_calls": [c0, c1]}, {"role": TOOL, "content": _probe(3)}])
    return ToolTexts(head=head, sys_head=sys_head, sys_tail=sys_tail, sep=sep, first=first,
                     call_sep=to_call[:len(to_call) - len(call_open)], call_open=call_open,
                     call_between=_between(two, _call_json(c0), _call_json(c1), "two calls in a row"),
                     call_close=close[:len(close) - len(after)])


def _think_texts(bare: Template, texts: TurnTexts) -> tuple[str, str] | None:
    """The texts around an assistant turn's reasoning, or None when the template does not render it."""
    messages = [{"role": "user", "content": _probe(0)},
                {"role": "assistant", "content": _probe(1), "reasoning": _probe(2)}, {"role": "user", "content": _probe(3)}]
    try:
        text = bare.render(messages, add_generation_prompt=True)
    except LorakitError:
        return None
    lead = _probe(0) + texts.between[("user", "assistant")]
    i, j, k = text.find(lead), text.find(_probe(2)), text.find(_probe(1))
    if i < 0 or not (i + len(lead) <= j < k):
        return None
    return text[i + len(lead):j], text[j + len(_probe(2)):k]


def _tool_conversations() -> list[tuple[list[dict], list]]:
    """Conversations with tools, calls, results and reasoning the derived texts must reproduce."""
    u = [{"role": "user", "content": f"{_probe(10 + i)} q\n"} for i in range(3)]
    s = {"role": "system", "content": f"{_probe(20)} be brief"}
    calls = [_probe_call(30), _probe_call(31)]
    a_call = {"role": "assistant", "content": "", "tool_calls": calls[:1]}
    a_both = {"role": "assistant", "content": f"{_probe(32)} let me look", "tool_calls": calls,
              "reasoning": f"{_probe(33)} think"}
    r = [{"role": TOOL, "content": f"{_probe(40 + i)} result"} for i in range(2)]
    a_text = {"role": "assistant", "content": f"{_probe(34)} done", "reasoning": f"{_probe(35)} why"}
    tools = [_probe_tool(50), _probe_tool(51)]
    out = []
    for msgs in ([u[0]], [s, u[0]], [u[0], a_call, r[0]], [s, u[0], a_both, r[0], r[1]],
                 [u[0], a_both, r[0], r[1], a_text, u[1]], [s, u[0], a_text, u[1], a_call, r[0]]):
        out += [(msgs, tools), (msgs, tools[:1])]
    out += [([u[0], a_text, u[1]], None), ([s, u[0], a_call, r[0]], None)]
    return out


def _check_tools(bare: Template, texts: TurnTexts) -> None:
    for messages, tools in _tool_conversations():
        try:
            want = bare.render(messages, add_generation_prompt=True, tools=tools)
        except LorakitError:
            continue
        if texts.render(messages, tools) != want:
            raise _NoTools("writes tools, calls or results in a way whose text depends on more than the "
                           "Hermes layout (checked conversation: roles "
                           f"{'/'.join(m['role'] for m in messages)})")


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


def _conversations(roles: tuple[str, ...] = ROLES) -> list[tuple[str, ...]]:
    """Every role sequence of 1-4 messages without two of one role in a row (Ollama merges those;
    tool results it keeps apart), ending in a message the model answers."""
    out = []
    for n in range(1, 5):
        for seq in itertools.product(roles, repeat=n):
            if seq[-1] != "assistant" and all(a != b or a == TOOL for a, b in zip(seq, seq[1:])):
                out.append(seq)
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


def _raw(text: str) -> str | None:
    """`text` as template text outside any action, or None when it cannot be (Ollama finds its
    tool-call and thinking tags only in such text: the first text in `{{ if .ToolCalls }}`, the
    text around `{{ .Thinking }}`)."""
    ok = text and "{{" not in text and '"""' not in text and not text.endswith("{")
    return text if ok and all(" " <= c <= "~" or c == "\n" for c in text) else None


def _text(text: str, raw: bool = False) -> str:
    """A text the TEMPLATE writes: raw when asked and possible, else a Go string literal."""
    if raw and _raw(text) is not None:
        return text
    return "{{ " + go_string(text) + " }}" if text else ""


def go_template(template: Template, add_bos: bool = False) -> str:
    """The Ollama TEMPLATE (Go text/template) that renders what `template` renders at generation.

    `add_bos`: the tokenizer adds BOS (so llama.cpp will), so a leading BOS text is dropped.
    Every literal is a Go string inside an action and every line starts with `{{-`, which trims the
    layout's newline and indent, so the output is exactly the derived texts; except the texts that
    open a call and surround reasoning, which are raw so that Ollama finds its tags there (they hold
    no whitespace Ollama's `{{-` trimming could reach: each is followed by an action without `-`).

    With tools (`TurnTexts.tools`), `.Tools` are written compact (Go's JSON, what Ollama passes),
    where training wrote json.dumps' spaced form; the texts around them are training's byte for byte."""
    t = turn_texts(template)
    if add_bos and template.bos_token:
        t.open.update({r: text.removeprefix(template.bos_token) for r, text in t.open.items()})
    roles = [r for r in ROLES + (TOOL,) if r in t.open or r in t.close]
    lines = ['{{- $prev := "" }}']
    c = t.tools
    if c is not None:
        head, sys_head = c.head, c.sys_head
        if add_bos and template.bos_token:
            head, sys_head = head.removeprefix(template.bos_token), sys_head.removeprefix(template.bos_token)
        lines += [
            "{{- if .Tools }}",
            '  {{- if and .Messages (eq (index .Messages 0).Role "system") }}' + _text(sys_head)
            + "{{ (index .Messages 0).Content }}" + _text(c.sys_tail),
            "  {{- else }}" + _text(head),
            "  {{- end }}",
            "  {{- range $k, $t := .Tools }}{{ if $k }}" + _text(c.sep) + "{{ end }}{{ $t }}{{ end }}",
            "{{- end }}",
        ]
    lines += ["{{- range $i, $m := .Messages }}"]
    if c is not None:
        lines += ['  {{- if and $.Tools (eq $i 0) (eq .Role "system") }}', "  {{- else }}"]
    lines += [
        '  {{- if eq $prev "" }}',
        *(["    {{- if $.Tools }}", *_chain([(f'eq .Role "{r}"', c.first[r]) for r in roles if r in c.first], "      "),
            "    {{- else }}"] if c is not None else []),
        *_chain([(f'eq .Role "{r}"', t.open[r]) for r in roles if r in t.open], "      " if c is not None else "    "),
        *(["    {{- end }}"] if c is not None else []),
        "  {{- else }}",
        *_chain([(f'and (eq $prev "{p}") (eq .Role "{r}")', text) for (p, r), text in t.between.items()], "    "),
        "  {{- end }}",
    ]
    if t.think is not None:
        lines.append('  {{- if and (eq .Role "assistant") .Thinking }}' + _text(t.think[0], raw=True)
                     + "{{ .Thinking }}" + _text(t.think[1], raw=True) + "{{ end }}")
    lines.append("  {{- .Content }}")
    if c is not None:
        lines += [
            "  {{- if and .Content .ToolCalls }}" + _text(c.call_sep) + "{{ end }}",
            "  {{- if .ToolCalls }}" + _text(c.call_open, raw=True) + "{{ range $j, $c := .ToolCalls }}{{ if $j }}"
            + _text(c.call_between) + '{{ end }}{{ "{\\"name\\": " }}{{ json .Function.Name }}'
            + '{{ ", \\"arguments\\": " }}{{ .Function.Arguments }}{{ "}" }}{{ end }}' + _text(c.call_close) + "{{ end }}",
        ]
    lines.append("  {{- $prev = .Role }}")
    if c is not None:
        lines.append("  {{- end }}")
    lines += ["{{- end }}", *_chain([(f'eq $prev "{r}"', t.close[r]) for r in roles if r in t.close])]
    return "\n".join(line for line in lines if line)


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
    add_bos = adds_bos(tokenizer)
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
