"""The `lorakit` command: one thin function per stage, no logic of its own.

User mistakes arrive as `LorakitError` and are printed as message + fix with exit code 2;
`--debug` shows the traceback. Anything else is a lorakit bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from lorakit.config.flags import add_flags, flag, given, section_from
from lorakit.errors import LorakitError


def _quiet_libraries() -> None:
    """Keep library chatter (hub hints, weight-loading bars) out of the user's terminal."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import logging
    import warnings

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    lk = logging.getLogger("lorakit")
    if not lk.handlers:
        lk.addHandler(handler)
    lk.setLevel(logging.INFO)
    # bitsandbytes (a dev/qlora dependency) warns at import about an optional CPU kernel package.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # PEFT still calls the name transformers 5.x deprecated; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _load_config(args):
    from lorakit import config

    return config.load(args.config, args.overrides)


def cmd_train(args) -> int:
    from lorakit.pipeline import train
    from lorakit.train import distributed

    run_dir = train(_load_config(args), resume=args.resume)
    if distributed.is_main():
        print(f"done: {run_dir}\nnext: lorakit generate {run_dir} --instruction \"...\"")
    return 0


def cmd_sweep(args) -> int:
    from lorakit.sweep import run as sweep_run

    if args.worker:
        return sweep_run.worker_main(args.config, args.overrides, trials=args.trials, storage=args.storage,
                                     threads=args.threads, until=args.until)
    paths = sweep_run.sweep(args.config, args.overrides, trials=args.trials, time_budget=args.time,
                            workers=args.workers, storage=args.storage)
    print(f"done: {paths.root}")
    return 0


def cmd_data(args) -> int:
    from lorakit.pipeline import data_report

    print(data_report(_load_config(args)))
    return 0


def cmd_plan(args) -> int:
    from lorakit.plan import format_plan, make_plan

    plan = make_plan(_load_config(args), device=args.device, memory_gb=args.memory_gb,
                     calibrate_steps=3 if args.calibrate else 0, processes=args.processes)
    print(format_plan(plan))
    return 0


def _settings(args, section: type):
    """The stage's section object from its flags, over the `--config` file's section when one is given."""
    explicit = given(build_parser(), args.argv) if args.config else None
    return section_from(args, section, args.section, explicit)


def _read_messages(args, system: str | None) -> list[dict]:
    from lorakit.infer import messages_from_instruction, read_messages_file

    if args.messages:
        return read_messages_file(args.messages)
    instruction = args.instruction
    if instruction is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise LorakitError("nothing to answer", hint="pass --instruction TEXT, --messages FILE.json, or pipe text on stdin")
        instruction = sys.stdin.read().strip()
        if not instruction:
            raise LorakitError("stdin was empty", hint="pipe a prompt, or pass --instruction TEXT")
    return messages_from_instruction(instruction, args.input or "", system)


def cmd_generate(args) -> int:
    from lorakit.config import GenerateConfig
    from lorakit.infer import generate, load_session

    settings = _settings(args, GenerateConfig)
    messages = _read_messages(args, settings.system)
    session = load_session(args.run, settings)

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    done = generate(session, messages, settings, stream=None if args.no_stream else emit, use_adapter=not args.base)
    print() if not args.no_stream else print(done.text)
    return 0


def cmd_eval(args) -> int:
    from lorakit.config import EvalConfig
    from lorakit.evaluate import format_summary
    from lorakit.pipeline import evaluate

    summaries = evaluate(args.run, _settings(args, EvalConfig))
    from lorakit.artifacts import RunPaths, find_adapter_dir

    for s in summaries:
        print(format_summary(s))
    print(f"per-example results: {RunPaths.of(find_adapter_dir(args.run)).eval_dir}/")
    return 0


def cmd_pairs(args) -> int:
    from lorakit.config import PairsConfig
    from lorakit.pairs import format_result, make_pairs

    print(format_result(make_pairs(args.run, _settings(args, PairsConfig)), args.run))
    return 0


def cmd_runs(args) -> int:
    from lorakit.runs import format_runs, list_runs

    print(format_runs(list_runs(args.dir)))
    return 0


def cmd_chat(args) -> int:
    from lorakit.artifacts import find_adapter_dir

    find_adapter_dir(args.run)  # a wrong path fails before the slow model import
    from lorakit.chat import chat, interrupts_reach_this_thread
    from lorakit.config import ChatConfig

    settings = _settings(args, ChatConfig)
    with interrupts_reach_this_thread():  # before torch is imported: its threads must not take Ctrl-C
        from lorakit.infer import load_session

        session = load_session(args.run, settings)
    return chat(session, settings, title=args.run)


def cmd_doctor(args) -> int:
    from lorakit.doctor import FAIL, format_checks, run_checks

    checks = run_checks()
    print(format_checks(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0


def cmd_config(args) -> int:
    from lorakit import config

    stages = config.stage_sections_of(args.config) if args.config and not args.overrides else None
    if stages:
        print(config.to_yaml(config.load_stages(args.config, stages), sections=stages), end="")
    elif args.config or args.overrides:
        print(config.to_yaml(_load_config(args)), end="")
    else:
        print(config.to_yaml() if args.yaml else config.describe(), end="")
    return 0


def cmd_report(args) -> int:
    from lorakit.report import write_report

    print(f"report: {write_report(args.run, args.out)}")
    return 0


def cmd_merge(args) -> int:
    from lorakit.config import MergeConfig
    from lorakit.merge import merge

    merge(args.run, args.out, _settings(args, MergeConfig))
    print(f"done: {args.out}\nload it with AutoModelForCausalLM.from_pretrained({str(args.out)!r})")
    return 0


def _refresh_report(run: str, files: list) -> None:
    """The run's report.html shows what export/ holds; a report that fails never costs the export."""
    from lorakit.artifacts import RunPaths, find_adapter_dir
    from lorakit.report import write_report

    paths = RunPaths.of(find_adapter_dir(run))
    if paths.adapter.is_dir() and any(f.parent == paths.export_dir for f in files):
        try:
            print(f"report: {write_report(paths.root)}")
        except Exception as e:  # noqa: BLE001 - the files are published; the page is a view of them
            print(f"warning: report.html not updated ({e})")


def cmd_export(args) -> int:
    from lorakit.config import ExportConfig
    from lorakit.export.run import export, run_settings

    s = section_from(args, ExportConfig, "export", base=run_settings(args.run))  # flags over the run's config.yaml
    result = export(args.run, s, adapter_only=args.adapter_only, ollama=args.ollama, out=args.out,
                    verify=not args.no_verify)
    for f in result.files:
        print(f"wrote {f}")
    _refresh_report(args.run, result.files)
    if result.ollama_command:
        print(f"Ollama folder: {result.ollama_dir}\nimport it with: {result.ollama_command}")
    return 0


def cmd_studio(args) -> int:
    from lorakit.config import StudioConfig
    from lorakit.studio.run import studio

    return studio(_settings(args, StudioConfig))


def cmd_serve(args) -> int:
    from lorakit.config import ServeConfig
    from lorakit.serve.run import serve

    return serve(_settings(args, ServeConfig))


def cmd_demo(args) -> int:
    from lorakit.demo.run import run_demo

    return run_demo(output_dir=args.output_dir, overrides=args.overrides)


# --------------------------------------------------------------------------- the parser
# One function per subcommand. A stage's settings are flags generated from its schema section
# (`lorakit.config.flags`): help, default, type and choices are the section field's.

STAGE_CONFIG_HELP = "YAML file whose `{name}:` section sets these options (a flag given here wins)"


def _with_config(sub, name: str, help_: str) -> argparse.ArgumentParser:
    sp = sub.add_parser(name, help=help_, description=help_ + " Any config key can be overridden: --lora.r 8")
    sp.add_argument("config", help="YAML config file")
    return sp


def _stage_parser(sub, name: str, help_: str, func, **kwargs) -> argparse.ArgumentParser:
    """A later stage's subcommand: its settings may also come from a file's `name:` section."""
    sp = sub.add_parser(name, help=help_, **kwargs)
    sp.add_argument("--config", metavar="FILE", help=STAGE_CONFIG_HELP.format(name=name))
    sp.set_defaults(func=func, overrides=[], section=name)
    return sp


def _training_parsers(sub) -> None:
    t = _with_config(sub, "train", "Fine-tune a LoRA adapter; writes runs/<name>/.")
    t.add_argument("--resume", action="store_true",
                   help="continue runs/<name> from its newest complete checkpoint (exact: optimizer, RNG, data position)")
    t.set_defaults(func=cmd_train)
    _with_config(sub, "data", "Show what training will see: counts, lengths, dropped rows, one masked example.") \
        .set_defaults(func=cmd_data)
    pl = _with_config(sub, "plan", "Before training: parameters, peak memory by part (CPU and GPU), time per epoch "
                      "from a short calibration, the guide's hyper-parameters for the dataset size, and a config "
                      "that fits.")
    pl.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to plan and fit for")
    pl.add_argument("--memory-gb", type=float, help="memory to fit in (default: available RAM, or the GPU's memory)")
    pl.add_argument("--processes", type=int, default=1, metavar="N",
                    help="plan for N processes (torchrun --nproc_per_node N): memory per process, effective batch")
    pl.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                    help="time a few real training steps (loads the model)")
    pl.set_defaults(func=cmd_plan)


SAMPLING_FLAGS = [flag("temperature"), flag("top_p"), flag("top_k"), flag("repetition_penalty"), flag("greedy"),
                  flag("seed")]
SESSION_FLAGS = [flag("dtype"), flag("trust_remote_code")]


def _sweep_parser(sub) -> None:
    sw = _with_config(sub, "sweep", "Search hyper-parameters (the config's sweep: section) on Optuna: trials pruned "
                      "early, resumable (run it again), shared by workers; writes runs/<name>/best.yaml.")
    sw.add_argument("--trials", type=int, metavar="N", help="trials to finish (sweep.trials)")
    sw.add_argument("--time", metavar="DURATION", help="time budget, e.g. 45m or 2h (sweep.time)")
    sw.add_argument("--workers", type=int, metavar="K", help="worker processes; cores split between them (sweep.workers)")
    sw.add_argument("--storage", metavar="URL", help="Optuna storage shared by machines (sweep.storage)")
    sw.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    sw.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    sw.add_argument("--until", type=float, help=argparse.SUPPRESS)
    sw.set_defaults(func=cmd_sweep)


def _generate_parser(sub) -> None:
    from lorakit.config import GenerateConfig

    g = _stage_parser(sub, "generate", "Answer a prompt with a trained adapter (template from training).",
                      cmd_generate)
    g.add_argument("run", help="run folder (runs/<name>) or adapter folder")
    g.add_argument("--instruction", "-i", help="the instruction (user message)")
    g.add_argument("--input", help="optional input/context for the instruction")
    add_flags(g, GenerateConfig, flag("system"))
    g.add_argument("--messages", help="JSON file with a list of chat messages")
    add_flags(g, GenerateConfig, flag("max_new_tokens"), *SAMPLING_FLAGS)
    g.add_argument("--base", action="store_true", help="answer with the base model (adapter disabled)")
    g.add_argument("--no-stream", action="store_true", help="print the answer at the end instead of streaming")
    add_flags(g, GenerateConfig, *SESSION_FLAGS)


def _chat_parser(sub) -> None:
    from lorakit.config import ChatConfig

    ch = _stage_parser(sub, "chat", "Talk with a trained adapter in the terminal: multi-turn, streamed, with the "
                       "trained template; /help inside lists the commands.", cmd_chat)
    ch.add_argument("run", help="run folder (runs/<name>) or adapter folder")
    add_flags(ch, ChatConfig, flag("system"), flag("max_new_tokens"), flag("max_context"), *SAMPLING_FLAGS,
              *SESSION_FLAGS)


def _eval_parser(sub) -> None:
    from lorakit.config import EvalConfig

    e = _stage_parser(sub, "eval", "Score a trained adapter on held-out data: loss, perplexity, exact match, "
                      "ROUGE-L, BLEU (and JSON field accuracy); --base puts the base model beside it.", cmd_eval)
    e.add_argument("run", help="run folder (runs/<name>) or its adapter folder")
    add_flags(e, EvalConfig, flag("data", nargs="+", action="store", metavar="FILE", default=None), flag("split"),
              flag("base"), flag("max_new_tokens"), flag("batch_size"), flag("limit"))


def _pairs_parser(sub) -> None:
    from lorakit.config import PairsConfig

    p = _stage_parser(sub, "pairs", "DPO preference pairs from the adapter's own mistakes: every held-out row it "
                      "answers wrong (by --metric) gives the reference as chosen and its answer as rejected.",
                      cmd_pairs)
    p.add_argument("run", help="run folder (runs/<name>) or its adapter folder")
    add_flags(p, PairsConfig, flag("data", nargs="+", action="store", metavar="FILE", default=None), flag("split"),
              flag("out", metavar="FILE"), flag("metric"), flag("threshold"), flag("samples", metavar="K"),
              flag("temperature"), flag("seed"), flag("max_new_tokens"), flag("batch_size"), flag("limit"))


def _merge_parser(sub) -> None:
    from lorakit.config import MergeConfig

    m = _stage_parser(sub, "merge", "Merge an adapter into its base (reloaded from disk in full precision) and "
                      "check that the merged model answers as base + adapter did.", cmd_merge)
    m.add_argument("run", help="run folder (runs/<name>) or adapter folder")
    m.add_argument("--out", required=True, help="folder for the merged model (a plain transformers folder)")
    add_flags(m, MergeConfig, flag("dtype"), flag("overwrite"))


def _export_parser(sub) -> None:
    from lorakit.config import ExportConfig

    x = sub.add_parser("export", help="Export to GGUF for llama.cpp / Ollama (merged or adapter-only), verified in "
                       "llama.cpp against transformers.")
    x.add_argument("run", help="run folder (runs/<name>) or adapter folder")
    add_flags(x, ExportConfig, flag("gguf"), flag("max_drop", metavar="POINTS"),
              flag("eval_data", metavar="FILE", help_suffix="; repeatable"), flag("eval_limit", metavar="N"),
              flag("max_new_tokens", metavar="N"), flag("metric"), flag("imatrix"),
              flag("imatrix_text", metavar="FILE"), flag("imatrix_keep", metavar="SHARE"), flag("max_size", metavar="MIB"),
              where="export.{key} of the run's config")
    x.add_argument("--adapter-only", action="store_true",
                   help="the base as GGUF plus the adapter in llama.cpp's LoRA format, instead of one merged file")
    x.add_argument("--ollama", action="store_true", help="also write an Ollama folder (GGUF + Modelfile)")
    x.add_argument("--out", help="output folder (default: RUN/export)")
    x.add_argument("--no-verify", action="store_true",
                   help="skip both checks in llama.cpp (token-level and task-level): the explicit way out")
    x.set_defaults(func=cmd_export, overrides=[])


def _serve_parser(sub) -> None:
    from lorakit.config import ServeConfig

    sv = _stage_parser(sub, "serve", "Serve the base and any number of adapters behind an OpenAI-compatible API "
                       "(continuous batching across adapters).", cmd_serve)
    add_flags(sv, ServeConfig, flag("adapters", "adapters", nargs="*", action="store", metavar="RUN_OR_ADAPTER"),
              flag("adapter", metavar="NAME=PATH"), flag("base"), flag("host"), flag("port"))
    add_flags(sv.add_mutually_exclusive_group(), ServeConfig, flag("api_key"), flag("api_key_file"))
    add_flags(sv, ServeConfig, flag("allow_adapter_loading"), flag("adapter_root", metavar="DIR"),
              flag("max_batch"), flag("max_queue"), flag("max_tokens_cap"), flag("timeout"))


def _studio_parser(sub) -> None:
    from lorakit.config import StudioConfig

    st = _stage_parser(sub, "studio", "A local web app over your runs: the runs table, live curves, eval answers "
                       "one by one, runs compared.", cmd_studio)
    add_flags(st, StudioConfig, flag("runs", metavar="DIR"), flag("data", metavar="DIR"), flag("host"), flag("port"),
              flag("token"))


def _tool_parsers(sub) -> None:
    """The commands around the stages: listing runs, checks, the schema, reports, the demo."""
    r = sub.add_parser("runs", help="List the runs in a folder, newest first: base, template, steps, losses, "
                       "exact match, date.")
    r.add_argument("dir", nargs="?", default="runs", help="folder holding run folders (default: runs)")
    r.set_defaults(func=cmd_runs, overrides=[])
    sub.add_parser("doctor", help="Check versions, GPU/bf16, bitsandbytes, llama.cpp and disk; print fixes.") \
        .set_defaults(func=cmd_doctor)
    c = sub.add_parser("config", help="Show every config key with its type, default and help.",
                       description="Without arguments: every key (training and every later stage's section) with "
                       "its type, default and help. --yaml: a complete commented default config. With CONFIG (and "
                       "--section.key overrides): that config's values as commented YAML.")
    c.add_argument("config", nargs="?", help="YAML config file whose values to show")
    c.add_argument("--yaml", action="store_true", help="print a commented default config to start from")
    c.set_defaults(func=cmd_config)
    rp = sub.add_parser("report", help="Write the run's report.html: curves, summary, diagnostics, base vs tuned.",
                        description="Write one self-contained HTML page (inline SVG plots, no network) for a run: "
                        "loss / eval loss, learning rate, gradient norm and tokens/s over steps; the config's "
                        "differences from the defaults; data counts and lengths; every diagnostic; and, after "
                        "`lorakit eval`, the base-vs-tuned table with sample answers. Training writes it too.")
    rp.add_argument("run", help="run folder (runs/<name>) or its adapter folder")
    rp.add_argument("--out", help="where to write it (default: RUN/report.html)")
    rp.set_defaults(func=cmd_report, overrides=[])
    d = sub.add_parser("demo", help="Fine-tune SmolLM2-135M on the bundled support data and compare with the base.")
    d.add_argument("--output-dir", default="runs", help="folder for the demo run")
    d.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorakit", description="LoRA / QLoRA fine-tuning from one YAML config.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)
    _training_parsers(sub)
    _sweep_parser(sub)
    for add in (_generate_parser, _eval_parser, _pairs_parser, _tool_parsers, _chat_parser, _merge_parser,
                _export_parser, _serve_parser, _studio_parser):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command in ("generate", "eval", "pairs", "runs", "chat", "report", "merge", "export", "serve",
                                  "studio"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    args.argv = argv
    _quiet_libraries()
    try:
        return args.func(args)
    except LorakitError as e:
        if args.debug:
            raise
        print(f"error: {e.render()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
