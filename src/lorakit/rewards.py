"""Reward functions for GRPO (train.method: grpo): plain Python that scores one sampled answer.

RL with verifiable rewards needs no reward model: a function checks what can be checked (the answer
equals the reference, parses as JSON, matches a pattern, ended by itself). `grpo.rewards` lists
the functions with a weight each; an answer's reward is the weighted sum, which GRPO compares with
the rewards of the other answers sampled for the same prompt.

A reward function::

    def my_reward(prompt: str, completion: str, **row) -> float

- `prompt`: the rendered prompt the model continued (template and system prompt included).
- `completion`: the generated answer, without its end-of-turn token or stop string.
- `row`: the data row's other columns (`schema`, an alpaca row's `output`, ...), plus
  - `reference`: the row's answer: its `reference` column, else a prompt/completion row's
    `completion`, else an alpaca row's `output` (absent when the row has none of them);
  - `finished`: True when the answer ended by itself (end-of-turn or a stop string), False when it
    was cut at grpo.max_completion_tokens. The GRPO trainer passes it with every row.
  A row's own `prompt` and `completion` columns are not passed under those names (the rendered
  prompt and the sampled answer are), nor is `lorakit_where` (the row's file and line, for errors).
  The reward's `args` come as keyword arguments too, and win over a column of the same name.
  A function that declares `**row` gets everything; one that names its parameters gets only those
  (`def right(prompt, completion, reference)`), and a named one the row lacks is an error naming it.
- returns: a finite int or float (numpy scalars and 0-d tensors too); a bool counts as 0 or 1.

Anything else, or an exception, stops training with an error naming the reward, the row and what
came back: a reward that is quietly wrong trains the wrong thing for hours. `Rewards.check` calls
every reward on the first rows before training starts, with an empty answer and with the row's
reference, so a broken reward fails at the first step rather than after an hour.

Built-ins (`name` in grpo.rewards, their `args`), each in [0, 1]:

- `exact_match` (column: reference): 1 when the answer equals the column after
  `metrics.normalize` (whitespace, case, trailing periods), as `lorakit eval` counts it.
- `json_valid` (type: any | object | array): 1 when the answer parses as JSON (a ```json fence
  allowed) of that type. 'any' also takes a bare `1`, which a policy finds quickly; prefer 'object'
  when the answer should be one.
- `json_fields` (column: reference): the share of the reference JSON's leaf fields the answer has
  with the same value (`metrics.json_fields`).
- `regex` (pattern, fullmatch: false, ignore_case: false): 1 when `re.search` finds the pattern;
  with fullmatch the whole answer, outer whitespace stripped, must match.
- `length` (target or max, tolerance): counted in characters of the answer with outer whitespace
  stripped (a reward sees text, not tokens, so it does not depend on the tokenizer). With target:
  1 at exactly target characters, falling linearly to 0 at target ± tolerance (default: target).
  With max: 1 up to max characters, then falling linearly to 0 at max + tolerance (default: max),
  a penalty on long answers only.
- `format` (pattern: null): 1 when the answer ended by itself rather than being cut at
  grpo.max_completion_tokens (`finished`); with a pattern it must also match the whole answer
  (outer whitespace stripped, `.` matches newlines), e.g. '<think>.*</think>\\s*<answer>.*</answer>'.

Your own reward is named 'path/to/file.py:function', a path relative to the config file's folder.
Only that file is loaded: no module is imported by a dotted name, and the file's folder is not put
on sys.path (keep helpers in the file, or install them as a package).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import inspect
import json
import math
import numbers
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence

from lorakit import metrics as M
from lorakit.config.grpo import BUILTIN_REWARDS, RewardConfig, reward_name_problem, split_user_reward
from lorakit.errors import ConfigError, LorakitError

WHERE = "lorakit_where"
"""Row key the trainer may set to the row's source ("train.jsonl line 7"): errors name it; never passed
to a reward."""

REFERENCE_COLUMNS = ("reference", "completion", "output")
"""Where a row's reference answer is, first present wins: a `reference` column, a prompt/completion
row's answer, an alpaca row's answer."""

_NOT_PASSED = ("prompt", "completion", WHERE)
_REQUIRED = object()  # marks a built-in's argument that has no default


class _Problems(Exception):
    """Problems of one reward entry, gathered into load_rewards' one ConfigError."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class Reward:
    """A loaded reward, with what its errors must name (config key, file) beside the function."""

    name: str  # as logs show it: the built-in's or the function's name; a repeat gets "_2", "_3"
    weight: float
    fn: Callable[..., Any]
    key: str  # where the config declares it: "grpo.rewards[1]"
    origin: str  # "built-in" or "/abs/path/file.py:function"
    args: dict[str, Any] = field(default_factory=dict)  # passed at every call (a built-in's are bound into fn)
    params: frozenset[str] | None = None  # keyword names fn takes; None: any (it declares **row)
    required: frozenset[str] = frozenset()  # keyword names fn takes without a default
    path: Path | None = None  # the user's file

    @property
    def label(self) -> str:
        return f"reward '{self.name}' ({self.key}, {self.origin})"

    def call(self, prompt: str, completion: str, row: Mapping[str, Any]) -> Any:
        """A function without **row gets only the names it declares, so `def f(prompt, completion,
        reference)` works on rows with more columns and on the `finished` flag every row carries."""
        kwargs = {**row, **self.args}
        if self.params is not None:
            missing = sorted(self.required - kwargs.keys())
            if missing:
                raise LorakitError(
                    f"its parameter {missing[0]!r} is not a column of this row (columns: {_columns(row)})",
                    hint=f"add {missing[0]!r} to every row, pass it in args, or give the parameter a default")
            kwargs = {k: v for k, v in kwargs.items() if k in self.params}
        return self.fn(prompt, completion, **kwargs)


class Rewards:
    """The loaded `grpo.rewards`: every function, its name in logs and its weight."""

    def __init__(self, rewards: list[Reward]):
        self.rewards = rewards

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    @property
    def weights(self) -> list[float]:
        return [r.weight for r in self.rewards]

    def __len__(self) -> int:
        return len(self.rewards)

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              rows: Sequence[Mapping[str, Any]]) -> tuple[list[float], dict[str, list[float]]]:
        """(weighted sum per answer, {reward name: its unweighted score per answer}).

        One prompt and one row per completion (a group repeats its prompt's). The trainer adds
        `finished` to each row. Raises LorakitError at the first reward that raises or returns
        something that is not a finite number."""
        return self._score(prompts, completions, rows, list(range(len(completions))), "")

    def check(self, rows: Sequence[Mapping[str, Any]], prompts: Sequence[str] | None = None,
              limit: int = 4) -> dict[str, dict[str, float | None]]:
        """Call every reward on the first `limit` rows, once with an empty answer and once with the
        row's reference answer where it has one, before any training step: a reward that raises or
        returns a non-number on real rows fails here, named with the row, and not an hour in.

        `prompts` are the rendered prompts of those rows (default: a row's `prompt` text, else "").
        Rows without `finished` count as finished. Returns {name: {"empty": mean score on empty
        answers, "reference": mean on the references, or None when no row has one}}: a reward that
        scores the references no higher than empty answers cannot tell good from bad, which the
        trainer can warn about."""
        sample = [{"finished": True, **row} for row in list(rows)[:limit]]
        if prompts is None:
            prompts = [row["prompt"] if isinstance(row.get("prompt"), str) else "" for row in sample]
        prompts = list(prompts)[:len(sample)]
        if len(prompts) != len(sample):
            raise ValueError(f"check: {len(prompts)} prompts for {len(sample)} rows; pass one per row")
        _, empty = self._score(prompts, [""] * len(sample), sample, list(range(len(sample))),
                               ", given an empty answer in the check before training")
        at = [i for i, row in enumerate(sample) if reference(row) is not None]
        ref: dict[str, list[float]] = {r.name: [] for r in self.rewards}
        if at:
            _, ref = self._score([prompts[i] for i in at], [_text(reference(sample[i])) for i in at],
                                 [sample[i] for i in at], at,
                                 ", given the row's reference answer in the check before training")
        return {name: {"empty": sum(v) / len(v) if v else None,
                       "reference": sum(ref[name]) / len(ref[name]) if ref[name] else None}
                for name, v in empty.items()}

    def _score(self, prompts, completions, rows, index: list[int], during: str):
        n = len(completions)
        if len(prompts) != n or len(rows) != n:
            raise ValueError(f"score: {len(prompts)} prompts, {n} completions and {len(rows)} rows; "
                             "pass one prompt and one row per completion")
        total = [0.0] * n
        per: dict[str, list[float]] = {r.name: [] for r in self.rewards}
        for i, (prompt, completion, row) in enumerate(zip(prompts, completions, rows)):
            kwargs = reward_kwargs(row)
            for r in self.rewards:
                value = _checked(r, prompt, completion, kwargs, f"row {index[i]} of the batch{during}",
                                 row.get(WHERE))
                per[r.name].append(value)
                total[i] += r.weight * value
        return total, per


# --------------------------------------------------------------------------- calling a reward


def reference(row: Mapping[str, Any]) -> Any:
    """The row's reference answer (REFERENCE_COLUMNS, first one set), or None."""
    return next((row[k] for k in REFERENCE_COLUMNS if row.get(k) is not None), None)


def reward_kwargs(row: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments a reward gets for `row` (the module docstring's `row`)."""
    out = {k: v for k, v in row.items() if k not in _NOT_PASSED}
    ref = reference(row)
    if ref is not None:
        out["reference"] = ref
    return out


def _checked(r: Reward, prompt: str, completion: str, kwargs: dict[str, Any], at: str, where: str | None) -> float:
    try:
        value = r.call(prompt, completion, kwargs)
    except LorakitError as e:  # a built-in's own finding (a column missing) or a parameter the row lacks
        raise LorakitError(f"{r.label} on {at}: {e.message}", hint=e.hint, where=where) from None
    except Exception as e:
        if r.path is None:
            raise  # a built-in failing otherwise is a bug in lorakit: keep its traceback
        raise LorakitError(
            f"{r.label} raised {type(e).__name__}: {e}{_frame(e, r.path)} on {at}",
            hint=f"fix {r.path.name}; a reward should return 0.0 for an answer it cannot score, not raise",
            where=where) from e
    number = _number(value)
    if number is None:
        fix = f"fix {r.path.name} so it returns" if r.path else "a reward returns"
        batched = (" (a reward is called once per answer and returns one number; TRL's reward functions take "
                   "and return lists)") if isinstance(value, (list, tuple)) else ""
        raise LorakitError(f"{r.label} returned {_shown(value)} on {at}, which is not a finite number",
                           hint=f"{fix} an int, a float or a bool for every answer{batched}", where=where)
    return number


def _number(value: Any) -> float | None:
    """`value` as a float when it is a finite real number (a bool is 0 or 1), else None."""
    if not isinstance(value, numbers.Real) and not isinstance(value, str) and callable(getattr(value, "item", None)):
        try:  # numpy scalars and 0-d tensors
            value = value.item()
        except Exception:
            return None
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    return None


def _shown(value: Any) -> str:
    if value is None:
        return "None"
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    if isinstance(value, float):
        return text
    return f"{text} (a {type(value).__name__})"


def _frame(e: BaseException, path: Path) -> str:
    """Where in the user's file it failed, e.g. " (r.py line 7)": the CLI prints no traceback for a
    LorakitError, and "division by zero" alone does not say which line of a long reward divided."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename) == path]
    return f" ({path.name} line {frames[-1].lineno})" if frames else ""


def _columns(row: Mapping[str, Any]) -> str:
    return ", ".join(sorted(row)) or "none"


def _text(value: Any) -> str:
    """A column's value as answer text: a string as it is, anything else (a JSON object, 42) as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _column(row: Mapping[str, Any], column: str, builtin: str) -> str:
    if row.get(column) is None:
        raise LorakitError(
            f"the row has no column {column!r} (columns: {_columns(row)})",
            hint=f"set args.column of {builtin} to the column that holds the answer, or add {column!r} to every row")
    return _text(row[column])


# --------------------------------------------------------------------------- built-ins


def _args(builtin: str, args: Mapping[str, Any], spec: dict[str, tuple[Any, Any]], key: str) -> dict[str, Any]:
    """`args` checked against spec {name: (accepted types, default or _REQUIRED)}, defaults filled."""
    problems, out = [], {}
    for name, value in args.items():
        if name not in spec:
            close = difflib.get_close_matches(str(name), list(spec), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"{key}.args.{name}: not an argument of {builtin}; {hint}"
                            f"its arguments: {', '.join(spec) or 'none'}")
            continue
        types, _ = spec[name]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            problems.append(f"{key}.args.{name}: expected {want}, got {value!r}")
            continue
        out[name] = value
    for name, (_, default) in spec.items():
        if name not in out and not any(p.startswith(f"{key}.args.{name}:") for p in problems):
            if default is _REQUIRED:
                problems.append(f"{key}.args.{name}: {builtin} needs it; add it under args")
            out[name] = default
    if problems:
        raise _Problems(problems)
    return out


def _compile(pattern: str, key: str, flags: int = 0) -> re.Pattern:
    try:
        return re.compile(pattern, flags)
    except re.error as e:
        raise _Problems([f"{key}.args.pattern: {pattern!r} is not a regular expression ({e}); "
                         "check it with Python's re module (in YAML, quote it with single quotes)"]) from None


def _exact_match(args: Mapping[str, Any], key: str) -> Callable[..., float]:
    column = _args("exact_match", args, {"column": ((str,), "reference")}, key)["column"]

    def exact_match(prompt: str, completion: str, **row: Any) -> float:
        return float(M.exact_match(completion, _column(row, column, "exact_match")))
    return exact_match


_JSON_TYPES = {"any": object, "object": dict, "array": list}


def _json_valid(args: Mapping[str, Any], key: str) -> Callable[..., float]:
    kind = _args("json_valid", args, {"type": ((str,), "any")}, key)["type"]
    if kind not in _JSON_TYPES:
        raise _Problems([f"{key}.args.type: {kind!r} is not one of {', '.join(map(repr, _JSON_TYPES))}"])

    def json_valid(prompt: str, completion: str, **row: Any) -> float:
        ok, value = M.parse_json(completion)
        return float(ok and isinstance(value, _JSON_TYPES[kind]))
    return json_valid


def _json_fields(args: Mapping[str, Any], key: str) -> Callable[..., float]:
    column = _args("json_fields", args, {"column": ((str,), "reference")}, key)["column"]

    def json_fields(prompt: str, completion: str, **row: Any) -> float:
        ref = _column(row, column, "json_fields")
        if not M.json_references([ref]):
            shown = ref if len(ref) <= 60 else ref[:57] + "..."
            raise LorakitError(
                f"column {column!r} is not a JSON object or array: {shown!r}",
                hint="json_fields compares the answer's fields with the reference's; fix the row, or use "
                     "exact_match for answers that are not JSON")
        hit, total = M.json_fields(completion, ref)
        if not total:  # {} or []: no field to count, so the answer must be that empty value
            return float(M.parse_json(completion) == M.parse_json(ref))
        return hit / total
    return json_fields


def _regex(args: Mapping[str, Any], key: str) -> Callable[..., float]:
    a = _args("regex", args, {"pattern": ((str,), _REQUIRED), "fullmatch": ((bool,), False),
                              "ignore_case": ((bool,), False)}, key)
    rx = _compile(a["pattern"], key, re.IGNORECASE if a["ignore_case"] else 0)
    full = a["fullmatch"]

    def regex(prompt: str, completion: str, **row: Any) -> float:
        return float((rx.fullmatch(completion.strip()) if full else rx.search(completion)) is not None)
    return regex


def _length(args: Mapping[str, Any], key: str) -> Callable[..., float]:
    a = _args("length", args, {"target": ((int, type(None)), None), "max": ((int, type(None)), None),
                               "tolerance": ((int, float, type(None)), None)}, key)
    target, most, tolerance = a["target"], a["max"], a["tolerance"]
    if (target is None) == (most is None):
        raise _Problems([f"{key}.args: length needs exactly one of target (1 at that many characters) "
                         "or max (1 up to that many characters)"])
    problems = [f"{key}.args.{k}: {a[k]} must be at least 1" for k in ("target", "max")
                if a[k] is not None and a[k] < 1]
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance > 0):
        problems.append(f"{key}.args.tolerance: {tolerance} must be above 0 (characters from the target or max "
                        "at which the reward reaches 0)")
    if problems:
        raise _Problems(problems)
    width = float(tolerance if tolerance is not None else (target or most))

    def length(prompt: str, completion: str, **row: Any) -> float:
        n = len(completion.strip())
        off = abs(n - target) if target is not None else max(0, n - most)
        return max(0.0, 1.0 - off / width)
    return length


def _format(args: Mapping[str, Any], key: str) -> Callable[..., float]:
    pattern = _args("format", args, {"pattern": ((str, type(None)), None)}, key)["pattern"]
    rx = _compile(pattern, key, re.DOTALL) if pattern is not None else None

    def format_(prompt: str, completion: str, **row: Any) -> float:
        if "finished" not in row:
            raise LorakitError(
                "the row carries no 'finished' flag (whether the answer ended by itself or was cut at "
                "grpo.max_completion_tokens)",
                hint="the GRPO trainer passes it with every row; calling Rewards.score yourself, add "
                     "finished: true or false to each row")
        if not row["finished"]:
            return 0.0
        return float(rx is None or rx.fullmatch(completion.strip()) is not None)
    return format_


BUILTINS: dict[str, Callable[[Mapping[str, Any], str], Callable[..., float]]] = {
    "exact_match": _exact_match, "json_valid": _json_valid, "json_fields": _json_fields,
    "regex": _regex, "length": _length, "format": _format,
}
"""Built-in name -> factory(args, config key) -> reward function; the names are config.grpo's."""
assert tuple(BUILTINS) == BUILTIN_REWARDS, "lorakit.config.grpo.BUILTIN_REWARDS and BUILTINS must agree"


# --------------------------------------------------------------------------- loading


def load_rewards(configs: Sequence[RewardConfig], base_dir: str | Path | None = None) -> Rewards:
    """The functions `grpo.rewards` names, checked before any is called: every problem (a name that
    is no built-in, a missing file or function, a bad argument) in one ConfigError.

    A user file's relative path is read from `base_dir`, the config file's folder (default: the
    current directory); a file named by two entries is loaded once."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    problems: list[str] = []
    if not configs:
        problems.append("grpo.rewards: empty; list at least one reward, e.g. [{name: exact_match}] "
                        f"(built-ins: {', '.join(BUILTIN_REWARDS)})")
    modules: dict[Path, ModuleType] = {}
    loaded: list[Reward] = []
    for i, rc in enumerate(configs):
        try:
            loaded.append(_load(rc, f"grpo.rewards[{i}]", base, modules))
        except _Problems as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    taken: set[str] = set()
    for r in loaded:  # a name logs once: a repeat gets "_2", "_3"
        name, k = r.name, 1
        while name in taken:
            k += 1
            name = f"{r.name}_{k}"
        taken.add(name)
        r.name = name
    return Rewards(loaded)


def _load(rc: RewardConfig, key: str, base: Path, modules: dict[Path, ModuleType]) -> Reward:
    problem = reward_name_problem(rc.name)
    if problem is not None:
        raise _Problems([f"{key}.name: {problem}"])
    weight = float(rc.weight)
    if not math.isfinite(weight):
        raise _Problems([f"{key}.weight: {rc.weight} must be a finite number"])
    user = split_user_reward(rc.name)
    if user is None:
        return Reward(rc.name, weight, BUILTINS[rc.name](rc.args, key), key, "built-in")
    path_text, function = user
    path = Path(path_text).expanduser()
    path = (path if path.is_absolute() else base / path).resolve()
    if not path.is_file():
        raise _Problems([f"{key}.name: reward file not found: {path} (from {rc.name!r}; a relative path is read "
                         f"from the config file's folder, {base}); fix the path"])
    if path not in modules:
        modules[path] = _run_file(path, key)
    fn = getattr(modules[path], function, None)
    if fn is None:
        mine = [n for n, v in vars(modules[path]).items() if inspect.isfunction(v) and not n.startswith("_")
                and v.__module__ == modules[path].__name__]
        close = difflib.get_close_matches(function, mine, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise _Problems([f"{key}.name: {path} has no function {function!r}; {hint}"
                         f"its functions: {', '.join(mine) or 'none'}"])
    if not callable(fn):
        raise _Problems([f"{key}.name: {function!r} in {path} is a {type(fn).__name__}, not a function; "
                         "name a function def'd in that file"])
    params, required = _parameters(fn, key, path, function, rc.args)
    return Reward(function, weight, fn, key, f"{path}:{function}", dict(rc.args), params, required, path)


def _run_file(path: Path, key: str) -> ModuleType:
    """Execute the user's file as a module of its own (registered while it runs, so dataclasses and
    pickling inside it work), under a name no import statement would reach."""
    stem = re.sub(r"\W", "_", path.stem)
    name = f"lorakit_reward_{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise _Problems([f"{key}.name: {path} cannot be loaded as Python; name a .py file"])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        del sys.modules[name]
        raise _Problems([f"{key}.name: {path} line {e.lineno}: {e.msg}; fix the file's syntax"]) from None
    except Exception as e:
        del sys.modules[name]
        fix = ("only this file is loaded and its folder is not on sys.path: install the module, or move the "
               "code into this file") if isinstance(e, ImportError) else "fix the file"
        raise _Problems([f"{key}.name: running {path} failed with {type(e).__name__}: {e}{_frame(e, path)}; "
                         f"{fix}"]) from None
    return module


def _parameters(fn: Callable[..., Any], key: str, path: Path, function: str,
                args: Mapping[str, Any]) -> tuple[frozenset[str] | None, frozenset[str]]:
    """(keyword names fn takes, or None when it takes **row; those without a default), after checking
    that it takes (prompt, completion) and every name in args."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a callable inspect cannot read: called with everything
        return None, frozenset()
    ps = list(sig.parameters.values())
    positional = [p for p in ps if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in ps):
        raise _Problems([f"{key}.name: {function}{sig} in {path} does not take (prompt, completion); "
                         "declare it as def " + function + "(prompt, completion, **row)"])
    named = [p for p in positional[2:] if p.kind is p.POSITIONAL_OR_KEYWORD] + \
            [p for p in ps if p.kind is p.KEYWORD_ONLY]
    if any(p.kind is p.VAR_KEYWORD for p in ps):
        return None, frozenset()
    names = frozenset(p.name for p in named)
    unknown = [a for a in args if a not in names]
    if unknown:
        raise _Problems([f"{key}.args.{unknown[0]}: {function}{sig} in {path} takes no parameter {unknown[0]!r}; "
                         f"add it to the function (or **row), or remove it from args"])
    return names, frozenset(p.name for p in named if p.default is p.empty)
