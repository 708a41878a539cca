"""`lorakit chat` driven through a real pseudo-terminal: the actual CLI process, typed input,
Ctrl-C as the terminal's interrupt character, and the streamed text as the terminal receives it.

Every answer is checked against `infer.generate` computed here, in-process, for the history the
chat should be holding (greedy decoding, same weights and CPU, so the token ids are equal), which
is what proves that the history is carried, trimmed, reset and switched as documented.

The model: the conftest tiny Llama (seed 1) with its layer matrices scaled x8. At the random
init (std 0.02) the base answers every prompt with newlines only, which print as nothing, so
"the base answered" could not be told from "nothing was printed"; scaled, the base says
(random) visible text, and answers change with the history. The adapter is `make_adapter`'s.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from conftest import build_tiny_model, make_adapter

import lorakit
from lorakit.chat import BASE, PROMPT, TUNED, chat, printable
from lorakit.config import ChatConfig
from lorakit.infer import Sampling, generate, load_session

pexpect = pytest.importorskip("pexpect")

START = 120  # s: process start imports torch/transformers/peft (~7 s here, much more on a loaded machine)
ANSWER = 60  # s: a 150-token answer of this model takes 0.5 s here idle, ~4 s with both cores busy
SHORT = 12  # --max-new-tokens of the main chat
LONG = 150  # --max-new-tokens of the Ctrl-C chat: 3-25 ms a token, so >= 0.4 s of streaming left after
# the first character, against the few ms the ^C takes to arrive (the model never stops by itself;
# had it finished first, the "[cut at" check below fails instead of passing wrongly)

Q1, Q2, Q3, Q4 = "Say hello.", "Classify this message.", "Extract the order number.", "Explain the return policy."


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("chat")
    base = build_tiny_model(root / "base", seed=1)
    weights = load_file(base / "model.safetensors")
    weights = {k: v * 8 if "layers" in k and v.ndim == 2 else v for k, v in weights.items()}
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    return make_adapter(base, AutoTokenizer.from_pretrained(base), root / "run", 1)


@pytest.fixture(scope="module")
def session(run):
    return load_session(run, log=lambda s: None)


def spawn(run: Path, *args: str, wait: bool = True, preexec_fn=None):
    env = dict(os.environ, PYTHONPATH=str(Path(lorakit.__file__).parents[1]), TERM="xterm")
    child = pexpect.spawn(sys.executable, ["-m", "lorakit", "chat", str(run), *args], env=env, cwd=str(run.parent),
                          encoding="utf-8", timeout=ANSWER, dimensions=(24, 1000), preexec_fn=preexec_fn)
    if wait:
        child.expect_exact(PROMPT, timeout=START)
    return child


def ask(child, text: str) -> tuple[str, str | None, list[str]]:
    """Send one line; return (everything printed up to the next prompt, the answer without its
    prefix (None when nothing was answered), the notices printed after it)."""
    child.sendline(text)
    child.expect_exact(PROMPT)
    out = child.before.replace("\r\n", "\n")  # the terminal turns each \n into \r\n
    lines = out.split("\n")[1:]  # the first line is the terminal's echo of what was typed
    start = next((i for i, line in enumerate(lines) if line.startswith((TUNED, BASE))), None)
    if start is None:
        return out, None, [line for line in lines if line.startswith("[")]
    end = len(lines)
    while end > start + 1 and (not lines[end - 1] or lines[end - 1].startswith("[")):
        end -= 1
    answer = "\n".join(lines[start:end])
    return out, answer, [line for line in lines[end:] if line]


def shown(completion) -> str:
    """What the terminal shows of an answer: its text with control characters made visible."""
    return printable(completion.text)


def test_multi_turn_base_reset_system_and_exit_through_a_terminal(run, session):
    short = Sampling(max_new_tokens=SHORT, greedy=True)
    a1 = generate(session, [user(Q1)], short)
    h2 = [user(Q1), bot(a1.text), user(Q2)]
    a2 = generate(session, h2, short)
    h3 = h2 + [bot(a2.text), user(Q3)]
    a3 = generate(session, h3, short)
    # The window: room for the three-question history and for the fourth without its oldest pair,
    # not for all four, so the fourth question must drop the oldest pair and only that one.
    encode = lambda msgs: len(session.template.encode_prompt(session.tokenizer, msgs))  # noqa: E731
    h4 = h3 + [bot(a3.text), user(Q4)]
    h4_trimmed = h4[2:]
    window = max(encode(h3), encode(h4_trimmed)) + SHORT
    assert encode(h4) > window - SHORT  # the full history does not fit
    a4 = generate(session, h4_trimmed, short)
    base1 = generate(session, [user(Q1)], short, use_adapter=False)
    sys1 = generate(session, [{"role": "system", "content": "Be brief."}, user(Q1)], short)
    # Preconditions that make the equalities below mean something: the history, the adapter, the
    # system message and the trimming each change the answer of this model.
    assert a2.text != generate(session, [user(Q2)], short).text
    assert base1.text and base1.text != a1.text
    assert sys1.text != a1.text
    assert a4.text != generate(session, [user(Q4)], short).text != generate(session, h4, short).text

    child = spawn(run, "--greedy", "--max-new-tokens", str(SHORT), "--max-context", str(window))
    try:
        out, answer, notices = ask(child, Q1)
        assert answer == TUNED + shown(a1)
        assert notices == [f"[cut at {SHORT} tokens (--max-new-tokens)]"]  # the tiny model never stops itself
        assert ask(child, Q2)[1] == TUNED + shown(a2)  # the first turn is in the prompt
        out, answer, _ = ask(child, Q3)
        assert answer == TUNED + shown(a3) and "dropped" not in out  # fits exactly
        out, answer, _ = ask(child, Q4)
        assert "[context full: dropped the 1 oldest turn to fit" in out
        assert answer == TUNED + shown(a4)

        assert "[conversation reset: 3 turns forgotten]" in ask(child, "/reset")[0]  # Q2..Q4 after the trim
        assert ask(child, Q1)[1] == TUNED + shown(a1)  # a fresh conversation again
        assert "base model" in ask(child, "/base")[0]
        assert ask(child, "/reset")[1] is None
        assert ask(child, Q1)[1] == BASE + shown(base1)
        assert "tuned model" in ask(child, "/base")[0]
        ask(child, "/reset")
        assert ask(child, Q1)[1] == TUNED + shown(a1)  # switched back

        ask(child, "/reset")
        assert "[system message set: Be brief.]" in ask(child, "/system Be brief.")[0]
        assert ask(child, Q1)[1] == TUNED + shown(sys1)

        help_text = ask(child, "/help")[0]
        assert all(cmd in help_text for cmd in ("/reset", "/system TEXT", "/base", "/exit", "/help"))
        out, answer, _ = ask(child, "/nope")
        assert answer is None and out.split("\n")[1:] == ["unknown command /nope; /help lists the commands", ""]
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_not_the_chat(run, session):
    # --max-context 250 leaves 250 - 150 = 100 tokens of conversation: a few short questions.
    child = spawn(run, "--greedy", "--max-new-tokens", str(LONG), "--max-context", str(LONG + 100), wait=False)
    try:
        fresh2 = generate(session, [user(Q2)], Sampling(max_new_tokens=LONG, greedy=True))  # while it starts
        child.expect_exact(PROMPT, timeout=START)
        child.sendline(Q1)
        child.expect_exact(TUNED)
        child.expect(r"\S")  # the answer is streaming: generation (and its SIGINT handler) is running
        child.sendintr()  # the terminal's ^C: SIGINT to the chat process
        child.expect_exact(PROMPT)
        assert "[stopped; this question and the partial answer are not kept]" in child.before
        assert "[cut at" not in child.before  # it did not run to the end

        # The stopped turn is not in the history: this is the first answer of a fresh chat.
        out, answer, notices = ask(child, Q2)
        assert answer == TUNED + shown(fresh2) and notices == [f"[cut at {LONG} tokens (--max-new-tokens)]"]

        # 120 words (480 tokens) is more than the 100 a message may take here: refused, nothing generated.
        out, answer, _ = ask(child, "hello " * 120)
        assert answer is None and "Nothing was generated" in out and "only 100 fit" in out

        _ctrl_c_at_the_prompt_then_ctrl_d(child)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def _ctrl_c_at_the_prompt_then_ctrl_d(child, timeout: float = -1) -> None:
    """Ctrl-C at the prompt discards the half-typed line and keeps the chat; Ctrl-D then ends it.
    `timeout` for the prompt to come back (-1: the child's own, ANSWER)."""
    child.send("half a line")
    # Wait for readline's echo, then for the process to be back in select(): CPython's input()
    # only notices a SIGINT that lands while it waits there; one that lands while readline still
    # handles the typed keys is kept until the next key (a race a loaded machine loses).
    child.expect_exact("half a line")
    _wait_for_input(child.pid)
    child.sendintr()
    child.expect_exact(PROMPT, timeout=timeout)
    assert "(Ctrl-C again, Ctrl-D or /exit to quit)" in child.before
    child.sendeof()
    child.expect(pexpect.EOF)


WAITING = {"7", "23", "270", "271"}  # x86-64 poll, select, pselect6, ppoll: where readline waits for a key


def _wait_for_input(pid: int, timeout: float = 10.0) -> None:
    """Until process `pid` is blocked waiting for input (its current system call, from
    /proc/PID/syscall, is one readline waits in), at most `timeout` seconds."""
    import platform

    if platform.machine() != "x86_64":  # other system call numbers: give readline time instead
        time.sleep(1.0)
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            call = Path(f"/proc/{pid}/syscall").read_text().split()[0]
        except (OSError, IndexError):
            call = ""
        if call in WAITING:
            return
        time.sleep(0.02)
    raise AssertionError(f"the chat (pid {pid}) did not go back to waiting for input within {timeout} s")


def test_ctrl_c_at_the_prompt_works_in_a_chat_started_with_sigint_ignored(run):
    """A shell's background job (`cmd &`, nohup) starts with SIGINT ignored, and Python keeps it so:
    the chat still takes Ctrl-C at the prompt (this is how the test suite itself is often run)."""
    import signal

    child = spawn(run, "--greedy", preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        _ctrl_c_at_the_prompt_then_ctrl_d(child, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_missing_run_is_a_clear_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(lorakit.__file__).parents[1]))
    child = pexpect.spawn(sys.executable, ["-m", "lorakit", "chat", str(tmp_path / "nope")], env=env,
                          encoding="utf-8", timeout=START)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
    assert f"error: no such folder: {tmp_path / 'nope'}" in child.before and "fix: pass a run folder" in child.before
    assert "Traceback" not in child.before


class _Interrupts:
    """A stdin whose every read is a Ctrl-C at the prompt."""

    def readline(self) -> str:
        raise KeyboardInterrupt


def test_two_ctrl_c_at_the_prompt_quit(session):
    import io

    out = io.StringIO()
    assert chat(session, ChatConfig(max_new_tokens=4, greedy=True), stdin=_Interrupts(), stdout=out) == 0
    # one hint after the first, then the second quits without generating anything
    assert out.getvalue().count("(Ctrl-C again") == 1 and TUNED not in out.getvalue()
