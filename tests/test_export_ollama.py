"""The Ollama export: the Modelfile's TEMPLATE, rendered by Go's own text/template the way Ollama
renders a chat, gives byte for byte the text lorakit trained on.

Ollama itself cannot be installed here; the renderer below does what Ollama's chat path does with
a TEMPLATE that uses .Messages: parse with missingkey=zero and Ollama's one template function
(`json`), prepend the Modelfile SYSTEM when the chat does not begin with a system message, merge
consecutive messages of one role with a blank line, execute with System, Messages and Response "".
Go comes from Debian's golang-go (scripts/setup.sh --test installs it); the test fails without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import CHATML
from lorakit.data.templates import Template, resolve_template
from lorakit.errors import LorakitError
from lorakit.export import ollama

GO_RENDERER = r'''
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

// What Ollama's chat path hands a TEMPLATE that uses .Messages: each message's Role, Content,
// Thinking and ToolCalls (a call's Function.Name, and Function.Arguments printing as compact JSON),
// and .Tools each printing as compact JSON (Ollama keeps the fields of its tool types; the tools
// sent here use only those).
type Args map[string]any

func (a Args) String() string {
	if a == nil {
		return "{}"
	}
	b, _ := json.Marshal(map[string]any(a))
	return string(b)
}

type Tool map[string]any

func (t Tool) String() string {
	b, _ := json.Marshal(map[string]any(t))
	return string(b)
}

type CallFunction struct {
	Index     int    `json:"index"`
	Name      string `json:"name"`
	Arguments Args   `json:"arguments"`
}

type Call struct {
	ID       string       `json:"id"`
	Function CallFunction `json:"function"`
}

type Message struct {
	Role      string `json:"role"`
	Content   string `json:"content"`
	Thinking  string `json:"thinking"`
	ToolCalls []Call `json:"tool_calls"`
}

type Case struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
	Tools    []Tool    `json:"tools"`
}

// Ollama registers the template function `json` (and some date helpers these templates do not use).
var funcs = template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}

func render(tmpl *template.Template, c Case) (string, error) {
	msgs := c.Messages
	if c.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]Message{{Role: "system", Content: c.System}}, msgs...)
	}
	var system []string
	var merged []*Message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		// consecutive messages of one role are merged, except tool results
		if n := len(merged); n > 0 && merged[n-1].Role == m.Role && m.Role != "tool" {
			merged[n-1].Content += "\n\n" + m.Content
		} else {
			merged = append(merged, &m)
		}
	}
	var tools []Tool
	if len(c.Tools) > 0 {
		tools = c.Tools
	}
	var b strings.Builder
	err := tmpl.Execute(&b, map[string]any{
		"System": strings.Join(system, "\n\n"), "Messages": merged, "Tools": tools, "Response": "",
	})
	return b.String(), err
}

// Where Ollama looks for its tags (my reading of its heuristics, not its code): the tool-call tag is
// the first non-blank template text inside an `if` on .ToolCalls, up to a "{"; the thinking tags
// are the first and last template texts of the list that holds {{ .Thinking }}.
func usesField(n parse.Node, name string) bool {
	found := false
	var walk func(parse.Node)
	walk = func(n parse.Node) {
		switch x := n.(type) {
		case *parse.PipeNode:
			for _, c := range x.Cmds {
				walk(c)
			}
		case *parse.CommandNode:
			for _, a := range x.Args {
				walk(a)
			}
		case *parse.FieldNode:
			for _, id := range x.Ident {
				found = found || id == name
			}
		}
	}
	walk(n)
	return found
}

func tags(root *parse.ListNode) (string, string, string) {
	var toolTag, open, close string
	var visit func(l *parse.ListNode)
	visit = func(l *parse.ListNode) {
		if l == nil {
			return
		}
		for _, n := range l.Nodes {
			switch x := n.(type) {
			case *parse.ActionNode:
				if usesField(x.Pipe, "Thinking") && len(l.Nodes) > 1 {
					if t, ok := l.Nodes[0].(*parse.TextNode); ok {
						open = strings.TrimSpace(string(t.Text))
					}
					if t, ok := l.Nodes[len(l.Nodes)-1].(*parse.TextNode); ok {
						close = strings.TrimSpace(string(t.Text))
					}
				}
			case *parse.IfNode:
				if toolTag == "" && usesField(x.Pipe, "ToolCalls") {
					for _, m := range x.List.Nodes {
						if t, ok := m.(*parse.TextNode); ok && strings.TrimSpace(string(t.Text)) != "" {
							toolTag, _, _ = strings.Cut(string(t.Text), "{")
							toolTag = strings.TrimSpace(toolTag)
							break
						} else if !ok {
							break
						}
					}
				}
				visit(x.List)
				visit(x.ElseList)
			case *parse.RangeNode:
				visit(x.List)
				visit(x.ElseList)
			}
		}
	}
	visit(root)
	return toolTag, open, close
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := make([]map[string]string, len(cases))
	for i, c := range cases {
		tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(c.Template)
		if err != nil {
			out[i] = map[string]string{"error": err.Error()}
			continue
		}
		s, err := render(tmpl, c)
		if err != nil {
			out[i] = map[string]string{"error": err.Error()}
			continue
		}
		toolTag, open, close := tags(tmpl.Tree.Root)
		out[i] = map[string]string{"text": s, "tool_tag": toolTag, "think_open": open, "think_close": close}
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		panic(err)
	}
}
'''


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """A function rendering [(template, system, messages)] with Go's text/template (built once)."""
    go = shutil.which("go")
    if go is None:
        pytest.fail("Go is not installed, so the Ollama TEMPLATE cannot be rendered by text/template: "
                    "run scripts/setup.sh --test (it installs Debian's golang-go) or `apt-get install -y golang-go`")
    root = tmp_path_factory.mktemp("go")
    (root / "main.go").write_text(GO_RENDERER, encoding="utf-8")
    # Standard library only, nothing downloads: no module proxy, no toolchain switch.
    env = {**os.environ, "GOCACHE": str(root / "cache"), "GOPATH": str(root / "gopath"), "GOPROXY": "off",
           "GOTOOLCHAIN": "local", "GOFLAGS": "", "CGO_ENABLED": "0"}
    build = subprocess.run([go, "build", "-o", str(root / "render"), "main.go"], cwd=root, env=env,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, f"go build failed:\n{build.stderr}"

    def render(cases: list[tuple], full: bool = False) -> list:
        """Each case is (TEMPLATE, SYSTEM, messages[, tools]), messages as lorakit's (a turn's
        `reasoning` is Ollama's `thinking`); the rendered texts, or with `full` each result's text
        and the tags Ollama would find."""
        payload = [{"template": c[0], "system": c[1] or "", "messages": [_as_ollama(m) for m in c[2]],
                    "tools": c[3] if len(c) > 3 else None} for c in cases]
        run = subprocess.run([str(root / "render")], input=json.dumps(payload), capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        errors = [o["error"] for o in out if "error" in o]
        assert not errors, f"text/template refused the TEMPLATE: {errors[0]}"
        return out if full else [o["text"] for o in out]

    return render


def _as_ollama(message: dict) -> dict:
    """A message as Ollama's API takes it."""
    out = {"role": message["role"], "content": message["content"]}
    if message.get("reasoning"):
        out["thinking"] = message["reasoning"]
    if message.get("tool_calls"):
        out["tool_calls"] = [{"function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
                             for c in message["tool_calls"]]
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from lorakit.config import ModelConfig
    from lorakit.model.load import load_tokenizer

    return load_tokenizer(ModelConfig())


def _templates(tiny_tokenizer, smollm2_tokenizer) -> dict[str, tuple[Template, object]]:
    """Every template kind: the built-ins, the tiny model's own chat template, SmolLM2's (which adds
    a default system header), and custom Jinja; with and without a default system prompt."""
    return {
        "alpaca": (resolve_template("alpaca", tiny_tokenizer), tiny_tokenizer),
        "alpaca+system": (resolve_template("alpaca", tiny_tokenizer, "You answer in one line."), tiny_tokenizer),
        "chatml": (resolve_template("chatml", tiny_tokenizer), tiny_tokenizer),
        "chatml+system": (resolve_template("chatml", tiny_tokenizer, 'Say "yes"\nthen stop.'), tiny_tokenizer),
        "tiny model": (resolve_template("model", tiny_tokenizer), tiny_tokenizer),
        "custom": (resolve_template(CHATML.replace("<|im_start|>", "<s>["), tiny_tokenizer), tiny_tokenizer),
        "smollm2": (resolve_template("model", smollm2_tokenizer), smollm2_tokenizer),
        "smollm2+system": (resolve_template("model", smollm2_tokenizer, "You are terse."), smollm2_tokenizer),
    }


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


def _s(text):
    return {"role": "system", "content": text}


CONVERSATIONS = {
    "one turn": [_u("Where is my order #12345?")],
    "one turn with system": [_s("You are a support agent."), _u("Where is my order?")],
    "several turns": [_u("Hi"), _a("Hello! How can I help?"), _u("Track order #555.")],
    "several turns with system": [_s("Be kind."), _u("Hi"), _a("Hello!"), _u("Bye"), _a("Goodbye."), _u("Wait")],
    # Content Go must not interpret or escape: actions, quotes, backslashes, HTML, non-ASCII, edges of whitespace.
    "awkward content": [_u('{{ .Role }} "quoted" \\n <b>&amp;</b>'), _a(" café ☕ 🚀\n\n"), _u("\tline1\nline2 ")],
}


def _modelfile_value(text: str, command: str) -> str | None:
    """A command's value as Ollama's Modelfile parser reads it: inside \"\"\"...\"\"\" or "...", no escapes."""
    m = re.search(rf'^{command} (?:"""(.*?)"""|"([^\n]*)")$', text, re.MULTILINE | re.DOTALL)
    return None if m is None else (m.group(1) if m.group(1) is not None else m.group(2))


def test_template_renders_what_training_rendered(go_render, tiny_tokenizer, smollm2_tokenizer, tmp_path):
    """For every template kind and conversation, the Modelfile read back and rendered by text/template
    equals `Template.render(..., add_generation_prompt=True)` byte for byte (the text encode_prompt
    tokenizes), the default system prompt coming from the Modelfile's SYSTEM; tokenized whole, that
    text gives encode_prompt's ids."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    cases, expected, labels, prompt_ids, tokenizers = [], [], [], [], []
    for kind, (template, tok) in _templates(tiny_tokenizer, smollm2_tokenizer).items():
        folder = ollama.write_ollama_folder(tmp_path / kind.replace(" ", "_"), gguf, template, tok,
                                            max_length=256, name="t")
        modelfile = (folder / "Modelfile").read_text(encoding="utf-8")
        go_source = _modelfile_value(modelfile, "TEMPLATE")
        assert go_source == ollama.go_template(template)
        # Ollama's parser keeps only printable characters and newlines: every escape stays in the Go literals.
        assert all(" " <= c <= "~" or c == "\n" for c in go_source)
        system = _modelfile_value(modelfile, "SYSTEM")
        assert system == template.system_prompt
        for name, messages in CONVERSATIONS.items():
            cases.append((go_source, system, messages))
            expected.append(template.render(messages, add_generation_prompt=True))
            labels.append(f"{kind} / {name}")
            prompt_ids.append(template.encode_prompt(tok, messages))
            tokenizers.append(tok)
    got = go_render(cases)
    for label, want, text, ids, tok in zip(labels, expected, got, prompt_ids, tokenizers):
        assert text == want, f"{label}: Go rendered {text!r}, lorakit {want!r}"
        # Ollama tokenizes the rendered prompt in one piece; lorakit tokenizes it span by span.  Both
        # tokenizers here add no BOS, so the one-piece ids must be the prompt ids training saw.
        assert not getattr(tok, "add_bos_token", False)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids, label
    # The table is not vacuous: a default system prompt is in the text, and SmolLM2 adds its own header.
    by_label = dict(zip(labels, got))
    assert "You answer in one line." in by_label["alpaca+system / several turns"]
    assert "You answer in one line." not in by_label["alpaca+system / one turn with system"]
    assert "named SmolLM" in by_label["smollm2 / one turn"]
    assert "named SmolLM" not in by_label["smollm2+system / one turn"]


def test_a_last_assistant_message_is_continued(go_render, tiny_tokenizer, smollm2_tokenizer):
    """Ollama continues a conversation that ends with an assistant message (prefill): the text is the
    generation prompt before it plus its content, with no end of turn after it."""
    cases, expected = [], []
    for template, _ in _templates(tiny_tokenizer, smollm2_tokenizer).values():
        before = [_u("Hi"), _a("Hello"), _u("Name a colour")]
        cases.append((ollama.go_template(template), template.system_prompt, before + [_a("Blu")]))
        expected.append(template.render(before, add_generation_prompt=True) + "Blu")
    assert go_render(cases) == expected


def test_a_bos_the_template_writes_is_left_to_llama_cpp(go_render, tiny_tokenizer):
    """A template that writes bos_token: kept when the tokenizer adds no BOS (the text is the prompt),
    dropped when it adds one (llama.cpp adds it from the GGUF; lorakit's ids hold one BOS, not two)."""
    template = resolve_template("{{ bos_token }}" + CHATML, tiny_tokenizer)
    messages = CONVERSATIONS["several turns"]
    kept, dropped = go_render([(ollama.go_template(template), None, messages),
                               (ollama.go_template(template, add_bos=True), None, messages)])
    assert kept == template.render(messages, add_generation_prompt=True)
    assert kept.startswith(tiny_tokenizer.bos_token)
    assert dropped == kept.removeprefix(tiny_tokenizer.bos_token)


def test_the_python_twin_matches_go(go_render, tiny_tokenizer):
    """`TurnTexts.render` (used to check a derivation before writing it) is what the Go template does."""
    template = resolve_template("alpaca", tiny_tokenizer)
    texts = ollama.turn_texts(template)
    conversations = list(CONVERSATIONS.values()) + [[_s("sys")], [_u("a"), _s("mid"), _u("b")]]
    got = go_render([(ollama.go_template(template), None, c) for c in conversations])
    assert got == [texts.render(c) for c in conversations]


@pytest.mark.parametrize("source, why", [
    # Content trimmed: Ollama's text/template has no trim, and training saw the trimmed text.
    ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}</s>{% endfor %}"
     "{% if add_generation_prompt %}<assistant>{% endif %}", "depends on more than its role"),
    # Turns numbered: the text around a message depends on its position.
    ("{% for m in messages %}[{{ loop.index }}] {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
     "{% if add_generation_prompt %}assistant:{% endif %}", "depends on more than its role"),
    # A template that cannot start with a user turn.
    ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
     "{% for m in messages %}{{ m['content'] }}{% endfor %}", "begins with a user message"),
])
def test_untranslatable_templates_are_refused(tiny_tokenizer, source, why):
    template = resolve_template(source, tiny_tokenizer)
    with pytest.raises(LorakitError) as e:
        ollama.go_template(template)
    assert e.value.where == "data.template"
    assert "template 'custom' cannot be written as an Ollama TEMPLATE" in e.value.message
    assert why in e.value.message
    assert "chatml or alpaca" in e.value.hint


def test_modelfile_commands(tiny_tokenizer):
    """FROM and ADAPTER relative to the folder, one stop per stop token, num_ctx = training length,
    SYSTEM only with a default system prompt."""
    chatml = resolve_template("chatml", tiny_tokenizer)
    text = ollama.modelfile_text(chatml, tiny_tokenizer, max_length=384, adapter=True)
    lines = [ln for ln in text.splitlines() if re.match(r"[A-Z]+ ", ln)]
    assert lines[0] == "FROM ./model.gguf"
    assert lines[1] == "ADAPTER ./adapter.gguf"
    assert lines[2].startswith('TEMPLATE """')
    assert [ln for ln in lines if ln.startswith("PARAMETER")] == ['PARAMETER stop "<|im_end|>"',
                                                                   "PARAMETER num_ctx 384"]
    assert "SYSTEM" not in text
    assert ollama.stop_texts(chatml, tiny_tokenizer) == [tiny_tokenizer.decode(chatml.stop_token_ids(tiny_tokenizer))]

    merged = ollama.modelfile_text(resolve_template("alpaca", tiny_tokenizer, "One line."), tiny_tokenizer,
                                   max_length=128)
    assert "ADAPTER" not in merged
    assert 'SYSTEM "One line."' in merged.splitlines()


def test_modelfile_quoting(tiny_tokenizer):
    """Ollama's Modelfile has no escapes: quotes and newlines go in \"\"\"...\"\"\"; what cannot be
    written is refused, naming the key."""
    quoted = resolve_template("chatml", tiny_tokenizer, 'Say "yes".\nAlways.')
    assert 'SYSTEM """Say "yes".\nAlways."""\n' in ollama.modelfile_text(quoted, tiny_tokenizer, max_length=64)
    for bad in ('a """ b', "bell \x07"):
        with pytest.raises(LorakitError, match="data.system_prompt"):
            ollama.modelfile_text(resolve_template("chatml", tiny_tokenizer, bad), tiny_tokenizer, max_length=64)


def test_go_string_escapes():
    assert ollama.go_string('a"b\\c\n\td') == r'"a\"b\\c\n\td"'
    assert ollama.go_string("é🚀\x00") == r'"\u00e9\U0001f680\u0000"'


def test_write_ollama_folder(tiny_tokenizer, tmp_path):
    """The folder holds the GGUFs under fixed names and the Modelfile; rewriting replaces it whole."""
    base, adapter = tmp_path / "base.gguf", tmp_path / "lora.gguf"
    base.write_bytes(b"GGUF base")
    adapter.write_bytes(b"GGUF lora")
    chatml = resolve_template("chatml", tiny_tokenizer)
    out = tmp_path / "ollama"
    (out).mkdir()
    (out / "stale.txt").write_text("old")
    folder = ollama.write_ollama_folder(out, base, chatml, tiny_tokenizer, adapter_gguf=adapter,
                                        max_length=256, name="support-bot:v1")
    assert folder == out
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "adapter.gguf", "model.gguf"]
    assert (out / "model.gguf").read_bytes() == b"GGUF base"
    assert (out / "adapter.gguf").read_bytes() == b"GGUF lora"
    assert (out / "Modelfile").read_text() == ollama.modelfile_text(chatml, tiny_tokenizer, max_length=256,
                                                                     adapter=True)
    assert ollama.create_command(out, "support-bot:v1") == f"ollama create support-bot:v1 -f {out}/Modelfile"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ollama")]  # no temporary left

    with pytest.raises(LorakitError, match="no GGUF file"):
        ollama.write_ollama_folder(tmp_path / "x", tmp_path / "missing.gguf", chatml, tiny_tokenizer,
                                   max_length=256, name="bot")
    with pytest.raises(LorakitError, match="not an Ollama model name"):
        ollama.write_ollama_folder(tmp_path / "x", base, chatml, tiny_tokenizer, max_length=256, name="my bot")
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- tools and reasoning

TOOLS = [
    {"type": "function", "function": {"name": "get_order", "description": "Look an order up by its number.",
                                      "parameters": {"type": "object", "required": ["id"],
                                                     "properties": {"id": {"type": "integer", "description": "order number"}}}}},
    {"type": "function", "function": {"name": "refund", "description": "Refund an order, café or not.",
                                      "parameters": {"type": "object", "properties": {
                                          "id": {"type": "integer"}, "reason": {"type": "string", "enum": ["late", "broken"]}}}}},
]


def _call(name: str, **args) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": args}}


def _r(text):
    return {"role": "tool", "content": text}


TOOL_CONVERSATIONS = {
    "tools, one question": ([_u("Where is order 12345?")], TOOLS),
    "tools and a system message": ([_s("You are the order desk."), _u("Where is 12345?")], TOOLS[:1]),
    "a call, its result, the answer": ([
        _u("Where is 12345?"), {"role": "assistant", "content": "", "tool_calls": [_call("get_order", id=12345)]},
        _r('{"status": "shipped"}'), _a("It has shipped."), _u("Refund 7 then, it was late.")], TOOLS),
    "reasoning, text and two calls, two results": ([
        _s("Be brief."), _u("Refund 7 and 8."),
        {"role": "assistant", "content": "Refunding both.", "reasoning": "Two orders: two calls.",
         "tool_calls": [_call("refund", id=7, reason="late"), _call("refund", id=8, reason="broken")]},
        _r("ok"), _r("ok")], TOOLS),
    "reasoning in an earlier answer": ([
        _u("Hi"), {"role": "assistant", "content": "Hello!", "reasoning": "A greeting."}, _u("Track 5.")], TOOLS),
    "calls in the history, no tools in the request": ([
        _u("Where is 12345?"), {"role": "assistant", "content": "", "tool_calls": [_call("get_order", id=12345)]},
        _r("shipped")], None),
}


def _json_values(text: str) -> str:
    """`text` with every JSON object in it written one canonical way (sorted keys, compact): Ollama
    hands a TEMPLATE the tools and a call's arguments as Go's compact JSON, where training wrote
    json.dumps' spaced form; with this, two texts are equal when everything outside JSON is byte for
    byte equal and every JSON object holds the same values."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i] == "{":
            try:
                value, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                value = None
            if isinstance(value, dict):
                out.append(json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False))
                i = end
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


def _go_json(value) -> str:
    """Go's json.Marshal of a map: sorted keys, compact, UTF-8 kept (<, > and & escaped: absent here)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def test_tools_calls_results_and_reasoning_render_as_trained(go_render, tiny_tokenizer):
    """chatml's tools, calls, tool results and reasoning through the TEMPLATE and text/template:
    everything outside JSON is training's text byte for byte, and every JSON object (a tool's
    description, a call's arguments) holds training's values, written compact as Ollama passes them.
    The Python twin, given Go's JSON, is the Go output exactly (export checks the TEMPLATE with it)."""
    cases, expected, twins, labels = [], [], [], []
    for system in (None, "You answer in one line."):
        template = resolve_template("chatml", tiny_tokenizer, system)
        go_source, texts = ollama.go_template(template), ollama.turn_texts(template)
        assert texts.tools is not None and texts.think == ("<think>\n", "\n</think>\n\n")
        for name, (messages, tools) in TOOL_CONVERSATIONS.items():
            cases.append((go_source, system, messages, tools))
            expected.append(template.render(messages, add_generation_prompt=True, tools=tools))
            normalized = template._normalize(messages)
            twins.append(texts.render(normalized, tools, dumps=_go_json))
            labels.append(f"{system} / {name}")
    got = go_render(cases)
    for label, want, twin, text in zip(labels, expected, twins, got):
        assert text == twin, f"{label}: Go rendered {text!r}, the twin {twin!r}"
        assert _json_values(text) == _json_values(want), f"{label}: Go rendered {text!r}, lorakit {want!r}"
    # not vacuous: the tools, the calls, the results and the reasoning are all in the text, and the
    # JSON really was written differently (so the comparison above needed _json_values)
    by_label = dict(zip(labels, got))
    text = by_label["None / reasoning, text and two calls, two results"]
    for part in ('"name":"refund"', '<tool_call>\n{"name": "refund", "arguments": {"id":7,"reason":"late"}}',
                 "<think>\nTwo orders: two calls.\n</think>\n\nRefunding both.\n<tool_call>", "<tool_response>\nok"):
        assert part in text, part
    assert text != expected[labels.index("None / reasoning, text and two calls, two results")]
    assert "You answer in one line.\n\n# Tools" in by_label["You answer in one line. / tools, one question"]


def test_ollama_finds_the_tool_call_and_thinking_tags(go_render, tiny_tokenizer):
    """Ollama gives a model the tools capability when its TEMPLATE uses .Tools, reads calls out of
    an answer after the tag it finds in the TEMPLATE (else it only tries an answer that starts with
    "{"), and the thinking capability when it finds the tags around .Thinking. chatml's TEMPLATE
    gives the tags the model was trained to write; alpaca's, which has no tools, none."""
    chatml, alpaca = (resolve_template(k, tiny_tokenizer) for k in ("chatml", "alpaca"))
    (with_tools, plain) = go_render([(ollama.go_template(chatml), None, [_u("hi")], TOOLS),
                                     (ollama.go_template(alpaca), None, [_u("hi")])], full=True)
    assert (with_tools["tool_tag"], with_tools["think_open"], with_tools["think_close"]) == \
        ("<tool_call>", "<think>", "</think>")
    assert ".Tools" in ollama.go_template(chatml) and ".Tools" not in ollama.go_template(alpaca)
    assert (plain["tool_tag"], plain["think_open"]) == ("", "")
    assert ollama.turn_texts(alpaca).why_no_tools == "template 'alpaca' does not render the tools it is given"
