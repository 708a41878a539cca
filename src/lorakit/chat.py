"""`lorakit chat RUN`: a multi-turn conversation with a trained adapter, in the terminal.

Every turn renders the whole conversation with the adapter's trained template and answers with
`infer.generate` (streamed, stopping on the template's stop tokens), so a chat shows what the
model does with exactly the format it learned.

Rules the loop keeps (and tests/test_chat.py checks through a real terminal):

- The history is the system message (--system or /system; without one, the template's trained
  default applies) and the user/assistant turns. /base switches which model answers the same
  history (the base is prompted with the adapter's template); /reset empties the turns and keeps
  the system message.
- The conversation must fit the context window (the model's positions, or less with
  --max-context) minus the tokens reserved for the answer (--max-new-tokens). When it does not,
  the oldest user/assistant pairs are dropped from the history, for good, with a notice; a
  message that does not fit even alone is refused and nothing is generated.
- Ctrl-C while an answer streams stops it after the next token (a SIGINT handler, installed only
  while generating, sets the `stop` event of `infer.generate`). The stopped question and its
  partial answer are dropped from the history: a cut answer ends without the end-of-turn the
  model would have produced, and the next question is usually a rephrasing, so the conversation
  goes on as if the stopped turn had not been asked.
- Ctrl-C at the prompt discards the line; a second one in a row, Ctrl-D, or /exit quits (exit 0).
- Model text is printed with control characters shown as their visible symbols (U+2400...), so a
  model cannot move the cursor or send escape sequences to the terminal.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, TextIO

from lorakit.config import ChatConfig
from lorakit.errors import LorakitError

if TYPE_CHECKING:  # importing lorakit.infer imports torch, which starts a thread: see interrupts_reach_this_thread
    from lorakit.infer import Sampling, Session

PROMPT = "you> "
TUNED, BASE = "tuned: ", "base: "

HELP = """commands:
  /help         this list
  /reset        forget the conversation (the system message stays)
  /system TEXT  set the system message (/system alone removes it); the turns stay
  /base         switch between the tuned model and the base model (adapter off), same history
  /exit         quit (also Ctrl-D, or Ctrl-C twice at the prompt)
Ctrl-C while an answer streams stops it; that turn is not kept. Start a line with // to send
a message that begins with /."""

UNKNOWN_POSITIONS = 10**7
"""Tokenizers without a known limit report model_max_length = 1e30; anything this large is not one."""


def printable(text: str) -> str:
    """`text` with C0/C1 control characters (except newline and tab) made visible: U+2400 + code
    for C0 (e.g. NUL -> ␀, ESC -> ␛), ␡ for DEL, U+FFFD for C1."""
    out = []
    for ch in text:
        o = ord(ch)
        if ch in "\n\t" or 32 <= o < 127 or o > 159:
            out.append(ch)
        elif o < 32:
            out.append(chr(0x2400 + o))
        elif o == 127:
            out.append("\u2421")
        else:
            out.append("\ufffd")
    return "".join(out)


def context_window(session: Session, max_context: int | None = None) -> int:
    """Tokens the model can attend to (prompt + answer): the model config's positions, the
    tokenizer's model_max_length when smaller, and `max_context` when smaller still."""
    config = session.model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    known = [getattr(config, key) for key in ("max_position_embeddings", "n_positions", "max_sequence_length")
             if isinstance(getattr(config, key, None), int)][:1]
    tok_max = getattr(session.tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < UNKNOWN_POSITIONS:
        known.append(tok_max)
    if max_context is not None:
        if max_context <= 0:
            raise LorakitError(f"--max-context {max_context} is not a number of tokens", hint="pass a positive N")
        known.append(max_context)
    if not known:
        raise LorakitError("this model's config does not say how long its context is",
                           hint="pass --max-context N (the number of tokens it was trained on)")
    return min(known)


@dataclass
class Conversation:
    """The history and how much of it fits: `limit` tokens of prompt (the window minus the answer)."""

    session: Session
    limit: int
    system: str | None = None
    use_adapter: bool = True  # False: the base model answers (/base)
    turns: list[dict] = field(default_factory=list)  # user, assistant, user, ... (the last may be the open question)

    def head(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def messages(self) -> list[dict]:
        return self.head() + self.turns

    def prompt_tokens(self, messages: list[dict]) -> int:
        return len(self.session.template.encode_prompt(self.session.tokenizer, messages))

    def ask(self, text: str) -> tuple[int, int | None]:
        """Add the user's message and make the conversation fit: returns (pairs dropped, None), or
        (0, its length in tokens) when the message does not fit even alone (it is not added)."""
        n = self.prompt_tokens(self.head() + [{"role": "user", "content": text}])
        if n > self.limit:
            return 0, n
        self.turns.append({"role": "user", "content": text})
        dropped = 0
        while len(self.turns) > 1 and self.prompt_tokens(self.messages()) > self.limit:
            del self.turns[:2]  # the oldest user message and its answer
            dropped += 1
        return dropped, None


def _reader(stdin: TextIO, stdout: TextIO) -> Callable[[str], str]:
    """A line reader: the builtin input() (with readline editing and history) on the process's own
    terminal, plain readline() on any other stream. EOF raises EOFError either way."""
    if stdin is sys.stdin and stdout is sys.stdout and stdin.isatty():
        try:
            import readline  # noqa: F401  (importing it is what turns on line editing in input())
        except ImportError:
            pass
        return input

    def read(prompt: str) -> str:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    return read


@contextmanager
def interrupts_reach_this_thread() -> Iterator[None]:
    """Import torch and load the model inside: SIGINT is blocked in this thread while inside, so every
    thread started here inherits the block (importing torch starts one; its worker pool is started
    here by a first parallel product, if loading did not), and
    unblocked in this thread alone on the way out. The terminal's Ctrl-C is sent to the process, and
    the kernel may hand it to any thread that does not block it: handled in a worker thread, it sets
    Python's flag without interrupting the main thread's wait for a key in readline, so a Ctrl-C at
    the prompt would only be noticed at the next key. (The failures the Ctrl-C test showed in CI
    were another cause: SIGINT inherited ignored, see `_ctrl_c_raises`.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
        import torch

        torch.ones(256, 256) @ torch.ones(256, 256)  # starts the intra-op pool, if loading did not
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextmanager
def _interrupt_sets(event: threading.Event) -> Iterator[None]:
    """While inside: Ctrl-C (SIGINT) sets `event` instead of raising KeyboardInterrupt.
    Signal handlers can only be set from the main thread; elsewhere the caller sets `event` itself."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def chat(session: Session, settings: ChatConfig, *, stdin: TextIO | None = None, stdout: TextIO | None = None,
         title: str = "") -> int:
    """Run the conversation loop until /exit or end of input; returns the exit status (0).

    `settings` decodes every answer (it is a `Sampling`) and holds the opening system message and
    the context window the history is trimmed to."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    window = context_window(session, settings.max_context)
    limit = window - settings.max_new_tokens
    if limit <= 0:
        raise LorakitError(f"--max-new-tokens {settings.max_new_tokens} leaves no room for the conversation in "
                           f"a context of {window} tokens", hint=f"use --max-new-tokens below {window}")
    conv = Conversation(session, limit, settings.system)

    def say(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    say(f"chat with {title or session.default.name} (template {session.template.name}; {window}-token context, "
        f"answers up to {settings.max_new_tokens} tokens)\n/help lists the commands; Ctrl-C stops an answer; "
        f"/exit or Ctrl-D quits\n")
    read = _reader(stdin, stdout)
    with _ctrl_c_raises():
        return _loop(read, conv, settings, say)


@contextmanager
def _ctrl_c_raises() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt at the prompt even in a chat started with SIGINT ignored:
    a shell's background job (`cmd &`, nohup) inherits SIGINT ignored, and Python then leaves it so,
    which made a Ctrl-C at the prompt do nothing (an answer's Ctrl-C worked: `_interrupt_sets`
    installs its own handler)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, signal.SIG_DFL, None):
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _loop(read, conv: "Conversation", settings: ChatConfig, say: Callable[[str], None]) -> int:
    interrupted = False  # the previous prompt ended with Ctrl-C
    while True:
        try:
            line = read(PROMPT).strip()
        except EOFError:
            say("\n")
            return 0
        except KeyboardInterrupt:
            if interrupted:
                say("\n")
                return 0
            interrupted = True
            say("\n(Ctrl-C again, Ctrl-D or /exit to quit)\n")
            continue
        interrupted = False
        if not line:
            continue
        if line.startswith("/") and not line.startswith("//"):
            if _command(line, conv, say) == "exit":
                return 0
            continue
        before = list(conv.turns)
        try:
            _turn(line[1:] if line.startswith("//") else line, conv, settings, say)
        except KeyboardInterrupt:  # Ctrl-C just outside the generation (while printing): same as a stop
            conv.turns[:] = before
            say("\n[stopped; this question and the partial answer are not kept]\n")


def _command(line: str, conv: Conversation, say: Callable[[str], None]) -> str | None:
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name == "/exit":
        return "exit"
    if name == "/help":
        say(HELP + "\n")
    elif name == "/reset":
        n = sum(1 for m in conv.turns if m["role"] == "user")
        conv.turns.clear()
        say(f"[conversation reset: {n} turn{'s' * (n != 1)} forgotten"
            f"{'; the system message stays' if conv.system else ''}]\n")
    elif name == "/system":
        conv.system = arg or None
        say(f"[system message set: {arg}]\n" if arg else "[system message removed]\n")
    elif name == "/base":
        conv.use_adapter = not conv.use_adapter
        say("[now answering: the tuned model (adapter on)]\n" if conv.use_adapter else
            "[now answering: the base model (adapter off); /base switches back]\n")
    else:
        say(f"unknown command {name}; /help lists the commands\n")
    return None


def _generate(*args, **kwargs):
    from lorakit.infer import generate

    return generate(*args, **kwargs)


def _turn(text: str, conv: Conversation, sampling: Sampling, say: Callable[[str], None]) -> None:
    """Answer one message: fit the history, stream the answer, record it (or not, when stopped)."""
    dropped, too_long = conv.ask(text)
    if too_long is not None:
        say(f"[your message is {too_long} tokens; with {sampling.max_new_tokens} kept for the answer only "
            f"{conv.limit} fit. Nothing was generated: shorten it, or lower --max-new-tokens]\n")
        return
    if dropped:
        say(f"[context full: dropped the {dropped} oldest turn{'s' * (dropped != 1)} to fit {conv.limit} tokens of "
            f"conversation]\n")
    started = [False]

    def emit(piece: str) -> None:
        if not started[0]:  # the answer starts at its first visible character, as Completion.text does
            piece = piece.lstrip()
            started[0] = bool(piece)
        if piece:
            say(printable(piece))

    stop = threading.Event()
    say(TUNED if conv.use_adapter else BASE)
    try:
        with _interrupt_sets(stop):
            done = _generate(conv.session, conv.messages(), sampling, stream=emit, use_adapter=conv.use_adapter,
                            stop=stop)
    except LorakitError as e:
        conv.turns.pop()
        say(f"\nerror: {e.render()}\n")
        return
    say("\n")
    if done.finish_reason == "cancelled":
        conv.turns.pop()
        say("[stopped; this question and the partial answer are not kept]\n")
        return
    conv.turns.append({"role": "assistant", "content": done.text})
    if done.finish_reason == "length":
        say(f"[cut at {sampling.max_new_tokens} tokens (--max-new-tokens)]\n")
