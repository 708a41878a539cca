"""GRPO rewards: the built-ins on hand-made answers, user functions loaded from a file, and every way a
reward can be wrong failing with its name and row, before training where possible; the grpo: section."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from lorakit import config
from lorakit.config import RewardConfig
from lorakit.config.grpo import BUILTIN_REWARDS
from lorakit.errors import ConfigError, LorakitError
from lorakit.rewards import BUILTINS, WHERE, load_rewards, reward_kwargs


def one(name: str, completion: str, row: dict | None = None, **args) -> float:
    """The score of one built-in with `args` on one answer."""
    total, _ = load_rewards([RewardConfig(name, args=args)]).score(["p"], [completion], [row or {}])
    return total[0]


def user_file(tmp_path, body: str, name: str = "my_rewards.py"):
    (tmp_path / name).write_text(textwrap.dedent(body), encoding="utf-8")
    return tmp_path / name


# --------------------------------------------------------------------------- built-ins


def test_builtin_names_are_the_schemas():
    assert tuple(BUILTINS) == BUILTIN_REWARDS


def test_exact_match_normalizes_and_reads_its_column():
    assert one("exact_match", "  30   Days. ", {"reference": "30 days"}) == 1.0
    assert one("exact_match", "31 days", {"reference": "30 days"}) == 0.0
    assert one("exact_match", "4", {"answer": 4}, column="answer") == 1.0  # a number column is its JSON text
    assert one("exact_match", "Paris", {"output": "paris"}) == 1.0  # an alpaca row's answer is the reference


def test_exact_match_without_the_column_names_row_and_column():
    rewards = load_rewards([RewardConfig("exact_match")])
    with pytest.raises(LorakitError) as e:
        rewards.score(["p", "p"], ["a", "b"], [{"reference": "a"}, {"answer": "b", WHERE: "train.jsonl line 2"}])
    text = str(e.value)
    assert text.startswith("train.jsonl line 2: reward 'exact_match' (grpo.rewards[0], built-in) on row 1")
    assert "no column 'reference' (columns: answer)" in text and "args.column" in text


def test_json_valid():
    assert one("json_valid", '{"a": 1}') == 1.0
    assert one("json_valid", '```json\n[1, 2]\n```') == 1.0  # the fence models add
    assert one("json_valid", '{"a": 1') == 0.0
    assert one("json_valid", "") == 0.0
    assert one("json_valid", "1") == 1.0 and one("json_valid", "1", type="object") == 0.0
    assert one("json_valid", "[1]", type="array") == 1.0 and one("json_valid", "[1]", type="object") == 0.0
    with pytest.raises(ConfigError, match=r"grpo.rewards\[0\].args.type: 'dict' is not one of"):
        load_rewards([RewardConfig("json_valid", args={"type": "dict"})])


def test_json_fields_counts_the_references_leaves():
    ref = {"reference": '{"name": "Ada", "age": 36, "tags": ["x", "y"]}'}
    assert one("json_fields", '{"name": "Ada", "age": 36, "tags": ["x", "y"]}', ref) == 1.0
    assert one("json_fields", '{"name": "Ada", "age": 37, "tags": ["x", "z"]}', ref) == 0.5  # 2 of 4 leaves
    assert one("json_fields", '{"name": "Ada", "age": 36', ref) == 0.0  # not JSON: no field
    assert one("json_fields", '{"a": 1}', {"gold": {"a": 1, "b": 2}}, column="gold") == 0.5  # an object column
    assert one("json_fields", "{}", {"reference": "{}"}) == 1.0  # no leaves: the answer must be that empty value
    assert one("json_fields", '{"a": 1}', {"reference": "{}"}) == 0.0


def test_json_fields_refuses_a_reference_that_is_not_json():
    with pytest.raises(LorakitError, match=r"on row 0 of the batch: column 'reference' is not a JSON object or array: "
                                           r"'forty-two'"):
        one("json_fields", "{}", {"reference": "forty-two"})


def test_regex_search_and_fullmatch():
    assert one("regex", "The answer is 42.", pattern=r"\d+") == 1.0
    assert one("regex", "The answer is 42.", pattern=r"\d+", fullmatch=True) == 0.0
    assert one("regex", " 42\n", pattern=r"\d+", fullmatch=True) == 1.0  # outer whitespace stripped
    assert one("regex", "YES", pattern="yes") == 0.0 and one("regex", "YES", pattern="yes", ignore_case=True) == 1.0


def test_regex_arguments_are_checked_when_loading():
    with pytest.raises(ConfigError) as e:
        load_rewards([RewardConfig("regex", args={"pattern": "(unclosed"}),
                      RewardConfig("regex", args={"pattern": "x", "full_match": True}),
                      RewardConfig("regex"), RewardConfig("regex", args={"pattern": "x", "fullmatch": "yes"})])
    assert e.value.problems[0].startswith("grpo.rewards[0].args.pattern: '(unclosed' is not a regular expression")
    assert "grpo.rewards[1].args.full_match: not an argument of regex; did you mean 'fullmatch'?" in e.value.problems[1]
    assert e.value.problems[2] == "grpo.rewards[2].args.pattern: regex needs it; add it under args"
    assert e.value.problems[3] == "grpo.rewards[3].args.fullmatch: expected bool, got 'yes'"


def test_length_target_and_max():
    assert one("length", "x" * 10, target=10) == 1.0
    assert one("length", "x" * 15, target=10) == pytest.approx(0.5)  # tolerance defaults to the target
    assert one("length", "x" * 8, target=10, tolerance=4) == pytest.approx(0.5)
    assert one("length", "", target=10) == 0.0 and one("length", "x" * 30, target=10) == 0.0
    assert one("length", "  " + "x" * 10 + "\n", target=10) == 1.0  # characters, outer whitespace stripped
    assert one("length", "x" * 3, max=5) == 1.0 and one("length", "x" * 5, max=5) == 1.0
    assert one("length", "x" * 7, max=5, tolerance=4) == pytest.approx(0.5)
    assert one("length", "x" * 12, max=5) == 0.0
    for bad in ({}, {"target": 5, "max": 5}):
        with pytest.raises(ConfigError, match="length needs exactly one of target"):
            load_rewards([RewardConfig("length", args=bad)])
    with pytest.raises(ConfigError, match=r"args.tolerance: 0 must be above 0"):
        load_rewards([RewardConfig("length", args={"max": 5, "tolerance": 0})])


def test_format_scores_answers_that_ended_by_themselves():
    assert one("format", "done", {"finished": True}) == 1.0
    assert one("format", "cut at max toke", {"finished": False}) == 0.0
    template = r"<think>.*</think>\s*<answer>.*</answer>"
    good = "<think>2+2\nis 4</think>\n<answer>4</answer>\n"
    assert one("format", good, {"finished": True}, pattern=template) == 1.0  # . spans lines
    assert one("format", good, {"finished": False}, pattern=template) == 0.0
    assert one("format", "<answer>4</answer>", {"finished": True}, pattern=template) == 0.0
    with pytest.raises(LorakitError, match="no 'finished' flag"):
        one("format", "done", {})


def test_weighted_sum_and_unweighted_scores_per_reward():
    rewards = load_rewards([RewardConfig("exact_match", 2.0), RewardConfig("json_valid", 0.5),
                            RewardConfig("regex", -1.0, {"pattern": "^1$"})])
    total, per = rewards.score(["p"] * 3, ["1", '{"a": 1}', "no"], [{"reference": "1"}] * 3)
    assert per == {"exact_match": [1.0, 0.0, 0.0], "json_valid": [1.0, 1.0, 0.0], "regex": [1.0, 0.0, 0.0]}
    assert total == [2.0 + 0.5 - 1.0, 0.5, 0.0]
    assert rewards.names == ["exact_match", "json_valid", "regex"] and rewards.weights == [2.0, 0.5, -1.0]
    with pytest.raises(ValueError, match="one prompt and one row per completion"):
        rewards.score(["p"], ["a", "b"], [{}, {}])


def test_what_a_reward_receives_of_the_row():
    row = {"prompt": "raw", "completion": "4", "schema": "s", "finished": True, WHERE: "f.jsonl line 1"}
    assert reward_kwargs(row) == {"schema": "s", "finished": True, "reference": "4"}
    assert reward_kwargs({"instruction": "i", "output": "o"})["reference"] == "o"
    assert reward_kwargs({"reference": "r", "output": "o"})["reference"] == "r"
    assert "reference" not in reward_kwargs({"instruction": "i"})


# --------------------------------------------------------------------------- your own rewards


def test_user_reward_from_a_path_relative_to_the_config_folder(tmp_path):
    (tmp_path / "rewards").mkdir()
    user_file(tmp_path / "rewards", """
        def contains(prompt, completion, word="4", **row):
            seen.append((prompt, completion, row))
            return word in completion

        def longer(prompt, completion, **row):
            return len(completion) > len(row["reference"])

        seen = []
    """)
    rewards = load_rewards([RewardConfig("rewards/my_rewards.py:contains", 1.0, {"word": "four"}),
                            RewardConfig("rewards/my_rewards.py:longer", 0.5)], base_dir=tmp_path)
    assert rewards.names == ["contains", "longer"]
    total, per = rewards.score(["Q: 2+2?"], ["four!"], [{"reference": "4", "finished": True, "id": 7}])
    assert per == {"contains": [1.0], "longer": [1.0]} and total == [1.5]
    module = rewards.rewards[0].fn.__globals__
    assert module["seen"] == [("Q: 2+2?", "four!", {"reference": "4", "finished": True, "id": 7})]
    assert rewards.rewards[1].fn.__globals__ is module  # one file, loaded once


def test_user_reward_gets_only_the_parameters_it_names(tmp_path):
    user_file(tmp_path, """
        def right(prompt, completion, reference):
            return completion == reference

        def strict(prompt, completion, *, answer, scale=1.0):
            return scale * (completion == answer)
    """)
    rewards = load_rewards([RewardConfig("my_rewards.py:right"),
                            RewardConfig("my_rewards.py:strict", args={"scale": 2})], base_dir=tmp_path)
    total, _ = rewards.score(["p"], ["4"], [{"reference": "4", "answer": "4", "finished": True, "other": 1}])
    assert total == [3.0]
    with pytest.raises(LorakitError, match=r"reward 'strict' .* on row 0 of the batch: its parameter 'answer' is not "
                                           r"a column of this row \(columns: finished, reference\)"):
        rewards.score(["p"], ["4"], [{"reference": "4", "finished": True}])
    with pytest.raises(ConfigError, match=r"grpo.rewards\[0\].args.weight: right\(prompt, completion, reference\) in "
                                          r".*my_rewards.py takes no parameter 'weight'"):
        load_rewards([RewardConfig("my_rewards.py:right", args={"weight": 2})], base_dir=tmp_path)
    user_file(tmp_path, "def lone(completion):\n    return 1.0\n", "lone.py")
    with pytest.raises(ConfigError, match=r"does not take \(prompt, completion\); declare it as def lone\(prompt, "
                                          r"completion, \*\*row\)"):
        load_rewards([RewardConfig("lone.py:lone")], base_dir=tmp_path)


def test_repeated_names_get_a_suffix(tmp_path):
    user_file(tmp_path, "def regex(prompt, completion, **row):\n    return 0\n")
    rewards = load_rewards([RewardConfig("regex", args={"pattern": "a"}), RewardConfig("regex", args={"pattern": "b"}),
                            RewardConfig("my_rewards.py:regex")], base_dir=tmp_path)
    assert rewards.names == ["regex", "regex_2", "regex_3"]
    assert set(rewards.score(["p"], ["a"], [{}])[1]) == {"regex", "regex_2", "regex_3"}


def test_missing_file_and_missing_function_are_named(tmp_path):
    user_file(tmp_path, "def correct(prompt, completion, **row):\n    return 1\n\nLIMIT = 3\n")
    with pytest.raises(ConfigError) as e:
        load_rewards([RewardConfig("nope.py:f"), RewardConfig("my_rewards.py:corect"),
                      RewardConfig("my_rewards.py:LIMIT")], base_dir=tmp_path)
    missing, no_function, not_callable = e.value.problems
    assert missing.startswith(f"grpo.rewards[0].name: reward file not found: {tmp_path.resolve() / 'nope.py'} "
                              f"(from 'nope.py:f'; a relative path is read from the config file's folder, {tmp_path})")
    assert no_function == (f"grpo.rewards[1].name: {tmp_path.resolve() / 'my_rewards.py'} has no function 'corect'; "
                           "did you mean 'correct'? its functions: correct")
    assert "'LIMIT' in" in not_callable and "is a int, not a function" in not_callable


def test_a_file_that_does_not_run_is_named_with_its_line(tmp_path):
    user_file(tmp_path, "def f(prompt, completion, **row)\n    return 1\n", "broken.py")
    user_file(tmp_path, "import not_a_module_anywhere\n", "imports.py")
    with pytest.raises(ConfigError) as e:
        load_rewards([RewardConfig("broken.py:f"), RewardConfig("imports.py:f")], base_dir=tmp_path)
    syntax, imports = e.value.problems
    assert "broken.py line 1:" in syntax and "fix the file's syntax" in syntax
    assert "running" in imports and "ModuleNotFoundError" in imports and "imports.py line 1" in imports
    assert "its folder is not on sys.path" in imports


def test_names_that_are_not_rewards():
    with pytest.raises(ConfigError) as e:
        load_rewards([RewardConfig("exact_mach"), RewardConfig("mypackage.rewards:score"), RewardConfig("r.py")])
    typo, dotted, no_function = e.value.problems
    assert typo.startswith("grpo.rewards[0].name: 'exact_mach' is not a built-in reward; did you mean 'exact_match'?")
    assert "is not a .py file" in dotted and "not imported by dotted name" in dotted
    assert "names a file but not its function; write it as 'r.py:function_name'" in no_function
    with pytest.raises(ConfigError, match="grpo.rewards: empty"):
        load_rewards([])


def test_a_reward_that_raises_is_named_with_row_and_line(tmp_path):
    user_file(tmp_path, """
        def ratio(prompt, completion, **row):
            return len(completion) / len(row["reference"])
    """)
    rewards = load_rewards([RewardConfig("my_rewards.py:ratio")], base_dir=tmp_path)
    rows = [{"reference": "ab"}, {"reference": "", WHERE: "train.jsonl line 9"}]
    with pytest.raises(LorakitError) as e:
        rewards.score(["p", "p"], ["a", "b"], rows)
    assert str(e.value).startswith(
        f"train.jsonl line 9: reward 'ratio' (grpo.rewards[0], {tmp_path.resolve() / 'my_rewards.py'}:ratio) raised "
        "ZeroDivisionError: division by zero (my_rewards.py line 3) on row 1 of the batch")
    assert e.value.hint.startswith("fix my_rewards.py") and isinstance(e.value.__cause__, ZeroDivisionError)


@pytest.mark.parametrize("returned, shown", [("None", "returned None"), ("'x'", "returned 'x' (a str)"),
                                             ("float('nan')", "returned nan"), ("float('-inf')", "returned -inf"),
                                             ("[1.0]", "returned [1.0] (a list)")])
def test_a_reward_that_returns_no_number_is_named(tmp_path, returned, shown):
    user_file(tmp_path, f"def bad(prompt, completion, **row):\n    return {returned}\n")
    rewards = load_rewards([RewardConfig("my_rewards.py:bad")], base_dir=tmp_path)
    with pytest.raises(LorakitError) as e:
        rewards.score(["p"], ["a"], [{}])
    assert "reward 'bad' (grpo.rewards[0], " in str(e.value)
    assert f"{shown} on row 0 of the batch, which is not a finite number" in str(e.value)
    assert e.value.hint.startswith("fix my_rewards.py so it returns an int, a float or a bool for every answer")
    assert ("TRL's reward functions take and return lists" in e.value.hint) == returned.startswith("[")


def test_bools_ints_and_numpy_scalars_are_numbers(tmp_path):
    user_file(tmp_path, """
        import numpy as np

        def flag(prompt, completion, **row):
            return completion == "a"

        def count(prompt, completion, **row):
            return 3

        def np_value(prompt, completion, **row):
            return np.float32(0.25) if completion == "a" else np.bool_(True)
    """)
    rewards = load_rewards([RewardConfig(f"my_rewards.py:{n}") for n in ("flag", "count", "np_value")],
                           base_dir=tmp_path)
    total, per = rewards.score(["p", "p"], ["a", "b"], [{}, {}])
    assert per == {"flag": [1.0, 0.0], "count": [3.0, 3.0], "np_value": [0.25, 1.0]}
    assert all(type(v) is float for v in per["np_value"]) and total == [4.25, 4.0]


def test_check_fails_a_broken_reward_before_training(tmp_path):
    user_file(tmp_path, """
        def first_word(prompt, completion, **row):
            return completion.split()[0] == row["reference"].split()[0]
    """)
    rewards = load_rewards([RewardConfig("exact_match"), RewardConfig("my_rewards.py:first_word")], base_dir=tmp_path)
    rows = [{"prompt": "Capital of France?", "completion": "Paris", WHERE: "train.jsonl line 1"}]
    with pytest.raises(LorakitError) as e:  # an empty answer has no first word
        rewards.check(rows)
    assert str(e.value).startswith("train.jsonl line 1: reward 'first_word'")
    assert "raised IndexError: list index out of range (my_rewards.py line 3) on row 0 of the batch, given an " \
           "empty answer in the check before training" in str(e.value)


def test_check_reaches_the_reference_answer_and_reports_means(tmp_path):
    user_file(tmp_path, """
        def needs_text(prompt, completion, **row):
            return 0.0 if not completion else float(completion.upper())
    """)
    rows = [{"prompt": "a", "completion": "yes"}, {"prompt": "b"},
            {"prompt": "c", "reference": "no", "finished": False}]
    rewards = load_rewards([RewardConfig("exact_match", args={"column": "reference"}), RewardConfig("format")])
    assert rewards.check(rows[::2]) == {"exact_match": {"empty": 0.0, "reference": 1.0},
                                        "format": {"empty": 0.5, "reference": 0.5}}  # a row's own finished wins
    broken = load_rewards([RewardConfig("my_rewards.py:needs_text")], base_dir=tmp_path)
    with pytest.raises(LorakitError, match=r"raised ValueError: could not convert string to float: 'YES' .* on row 0 "
                                           r"of the batch, given the row's reference answer in the check"):
        broken.check(rows)
    with pytest.raises(LorakitError, match=r"on row 1 of the batch, given an empty answer in the check before "
                                           r"training: the row has no column 'reference'"):
        rewards.check(rows)  # row 1 has no answer: exact_match cannot score it, before any step
    assert rewards.check([]) == {"exact_match": {"empty": None, "reference": None},
                                 "format": {"empty": None, "reference": None}}


# --------------------------------------------------------------------------- the grpo: section


def write(tmp_path, text: str):
    path = tmp_path / "grpo.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


GRPO_YAML = """
    data: {train: train.jsonl}
    train: {method: grpo}
    grpo:
      generations: 8
      epsilon_high: 0.28
      scale_rewards: none
      rewards:
        - name: exact_match
          weight: 2
        - {name: regex, args: {pattern: '^\\d+$', fullmatch: true}}
        - name: mine/r.py:score
          weight: 0.5
          args: {bonus: 1}
"""


def test_grpo_section_loads_from_yaml(tmp_path):
    (tmp_path / "mine").mkdir()
    user_file(tmp_path / "mine", "def score(prompt, completion, *, bonus, **row):\n    return bonus\n", "r.py")
    cfg = config.load(write(tmp_path, GRPO_YAML))
    g = cfg.grpo
    assert (g.generations, g.epsilon_high, g.scale_rewards, g.loss_type, g.beta) == (8, 0.28, "none", "dapo", 0.0)
    assert g.rewards == [RewardConfig("exact_match", 2.0),
                         RewardConfig("regex", 1.0, {"pattern": r"^\d+$", "fullmatch": True}),
                         RewardConfig(f"{tmp_path / 'mine' / 'r.py'}:score", 0.5, {"bonus": 1})]
    rewards = load_rewards(g.rewards, base_dir=tmp_path)
    assert rewards.names == ["exact_match", "regex", "score"]
    assert rewards.score(["p"], ["12"], [{"reference": "12"}])[0] == [2.0 + 1.0 + 0.5]
    shown = tmp_path / "shown.yaml"  # `lorakit config` of it, and the run folder's config.yaml, load back the same
    shown.write_text(config.to_yaml(cfg), encoding="utf-8")
    assert config.load(shown) == cfg
    shown.write_text(config.dump(cfg), encoding="utf-8")
    assert config.load(shown) == cfg


def test_a_misspelt_key_inside_a_reward_gets_did_you_mean(tmp_path):
    text = GRPO_YAML.replace("weight: 2", "wieght: 2").replace("{pattern:", "{patern: x, pattern:")
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, text.replace("- {name: regex", "- {nmae: regex")))
    valid = "; valid keys here: name, weight, args"
    assert e.value.problems == [
        "unknown key 'grpo.rewards[0].wieght' (did you mean 'grpo.rewards[0].weight'?)" + valid,
        "unknown key 'grpo.rewards[1].nmae' (did you mean 'grpo.rewards[1].name'?)" + valid,
    ]  # a built-in's own args are checked when the rewards load (test_regex_arguments_are_checked_when_loading)


def test_a_reward_entry_must_be_a_mapping_with_a_name(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, "data: {train: t.jsonl}\ngrpo:\n  rewards: [json_valid, {weight: 2}, "
                                    "{name: regex, args: [x]}]\n"))
    assert e.value.problems == [
        "grpo.rewards[0]: expected a mapping with the keys name, weight, args, got str 'json_valid' "
        "(write it as {name: 'json_valid'})",
        "grpo.rewards[1]: key 'name' is missing; add it (" + config.RewardConfig.__dataclass_fields__["name"]
        .metadata["help"] + ")",
        "grpo.rewards[2].args: expected a mapping of names to values, got list ['x']",
    ]


def test_grpo_rules_apply_under_train_method_grpo(tmp_path):
    assert config.load(write(tmp_path, "data: {train: t.jsonl}\ngrpo: {generations: 1}\n")).grpo.generations == 1
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, """
            data: {train: t.jsonl}
            train: {method: grpo}
            grpo: {generations: 1, temperature: 0, top_p: 0, epsilon: 1.5, epsilon_high: 0, beta: -1,
                   prompts_per_step: 0}
        """))
    problems = "\n".join(e.value.problems)
    for key in ("grpo.rewards: empty", "grpo.prompts_per_step: 0", "grpo.generations: 1", "grpo.temperature: 0",
                "grpo.top_p: 0", "grpo.beta: -1", "grpo.epsilon: 1.5", "grpo.epsilon_high: 0"):
        assert key in problems
    with pytest.raises(ConfigError, match=r"grpo.rewards\[0\].name: 'json_vaild' is not a built-in reward; did you "
                                          r"mean 'json_valid'\?"):
        config.load(write(tmp_path, "data: {train: t.jsonl}\ntrain: {method: grpo}\n"
                                    "grpo: {rewards: [{name: json_vaild}]}\n"))


def test_lorakit_config_lists_the_grpo_keys(capsys):
    from lorakit.cli import main

    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for key, default in [("rewards", "[]"), ("prompts_per_step", "4"), ("generations", "4"),
                         ("max_completion_tokens", "64"), ("temperature", "0.9"), ("top_p", "1.0"), ("beta", "0.0"),
                         ("epsilon", "0.2"), ("epsilon_high", "null"), ("loss_type", "dapo"),
                         ("updates_per_batch", "1"), ("scale_rewards", "group")]:
        assert f"grpo.{key}  (default: {default})" in out
    assert "type: list[RewardConfig {name: str, weight: float, args: mapping}]" in out
    assert "'grpo'" in out.split("\ntrain.method  (default: sft)\n", 1)[1].split("\n")[0]  # a choice of train.method
    assert yaml.safe_load(config.to_yaml())["grpo"]["rewards"] == []
