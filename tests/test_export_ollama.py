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
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
}

// Ollama registers one template function.
var funcs = template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}

func render(c Case) (string, error) {
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(c.Template)
	if err != nil {
		return "", err
	}
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
		if n := len(merged); n > 0 && merged[n-1].Role == m.Role {
			merged[n-1].Content += "\n\n" + m.Content
		} else {
			merged = append(merged, &m)
		}
	}
	var b strings.Builder
	err = tmpl.Execute(&b, map[string]any{
		"System": strings.Join(system, "\n\n"), "Messages": merged, "Tools": nil, "Response": "",
	})
	return b.String(), err
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := make([]map[string]string, len(cases))
	for i, c := range cases {
		if s, err := render(c); err != nil {
			out[i] = map[string]string{"error": err.Error()}
		} else {
			out[i] = map[string]string{"text": s}
		}
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

    def render(cases: list[tuple[str, str, list[dict]]]) -> list[str]:
        payload = [{"template": t, "system": s or "", "messages": m} for t, s, m in cases]
        run = subprocess.run([str(root / "render")], input=json.dumps(payload), capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        errors = [o["error"] for o in out if "error" in o]
        assert not errors, f"text/template refused the TEMPLATE: {errors[0]}"
        return [o["text"] for o in out]

    return render


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
