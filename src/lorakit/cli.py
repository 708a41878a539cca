"""The `lorakit` command: one thin function per stage, no logic of its own.

User mistakes arrive as `LorakitError` and are printed as message + fix with exit code 2;
`--debug` shows the traceback. Anything else is a lorakit bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

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


def cmd_data(args) -> int:
    from lorakit.data.dataset import prepare
    from lorakit.data.report import format_report
    from lorakit.model.load import load_tokenizer

    cfg = _load_config(args)
    tokenizer = load_tokenizer(cfg.model)
    print(format_report(prepare(cfg, tokenizer), tokenizer))
    return 0


def cmd_plan(args) -> int:
    from lorakit.plan import format_plan, make_plan

    plan = make_plan(_load_config(args), device=args.device, memory_gb=args.memory_gb,
                     calibrate_steps=3 if args.calibrate else 0, processes=args.processes)
    print(format_plan(plan))
    return 0


def _read_messages(args) -> list[dict]:
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
    return messages_from_instruction(instruction, args.input or "", args.system)


def cmd_generate(args) -> int:
    from lorakit.infer import generate, load_session

    messages = _read_messages(args)
    session = load_session(args.run, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    sampling = _sampling(args)

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    done = generate(session, messages, sampling, stream=None if args.no_stream else emit, use_adapter=not args.base)
    print() if not args.no_stream else print(done.text)
    return 0


def cmd_eval(args) -> int:
    from lorakit.evaluate import format_summary
    from lorakit.pipeline import evaluate

    summaries = evaluate(args.run, data=args.data, split=args.split, base=args.base,
                             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit)
    from lorakit.artifacts import RunPaths, find_adapter_dir

    for s in summaries:
        print(format_summary(s))
    print(f"per-example results: {RunPaths.of(find_adapter_dir(args.run)).eval_dir}/")
    return 0


def cmd_runs(args) -> int:
    from lorakit.runs import format_runs, list_runs

    print(format_runs(list_runs(args.dir)))
    return 0


def cmd_chat(args) -> int:
    from lorakit.artifacts import find_adapter_dir

    find_adapter_dir(args.run)  # a wrong path fails before the slow model import
    from lorakit.chat import chat
    from lorakit.infer import load_session

    session = load_session(args.run, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    return chat(session, _sampling(args), system=args.system, max_context=args.max_context, title=args.run)


def cmd_doctor(args) -> int:
    from lorakit.doctor import FAIL, format_checks, run_checks

    checks = run_checks()
    print(format_checks(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0


def cmd_config(args) -> int:
    from lorakit import config

    if args.config or args.overrides:
        print(config.to_yaml(_load_config(args)), end="")
    else:
        print(config.to_yaml() if args.yaml else config.describe(), end="")
    return 0


def cmd_report(args) -> int:
    from lorakit.report import write_report

    print(f"report: {write_report(args.run, args.out)}")
    return 0


def cmd_merge(args) -> int:
    from lorakit.merge import merge

    merge(args.run, args.out, dtype=args.dtype, overwrite=args.overwrite)
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
    from lorakit.export.run import export

    result = export(args.run, gguf=args.gguf, adapter_only=args.adapter_only, ollama=args.ollama, out=args.out,
                    verify=not args.no_verify, max_drop=args.max_drop, eval_data=args.eval_data,
                    eval_limit=args.eval_limit, metric=args.metric, max_new_tokens=args.max_new_tokens,
                    imatrix=args.imatrix, imatrix_text=args.imatrix_text, max_size=args.max_size)
    for f in result.files:
        print(f"wrote {f}")
    _refresh_report(args.run, result.files)
    if result.ollama_command:
        print(f"Ollama folder: {result.ollama_dir}\nimport it with: {result.ollama_command}")
    return 0


def cmd_serve(args) -> int:
    from lorakit.serve.run import serve

    return serve(args.adapters, args.adapter, base=args.base, host=args.host, port=args.port, api_key=args.api_key,
                 api_key_file=args.api_key_file, allow_adapter_loading=args.allow_adapter_loading,
                 adapter_roots=args.adapter_root, max_batch=args.max_batch, max_queue=args.max_queue,
                 max_tokens_cap=args.max_tokens_cap, timeout=args.timeout)


def cmd_demo(args) -> int:
    from lorakit.demo.run import run_demo

    return run_demo(output_dir=args.output_dir, overrides=args.overrides)


def _sampling_options(sp: argparse.ArgumentParser) -> None:
    """The decoding flags `generate` and `chat` share (their defaults are `infer.Sampling`'s)."""
    sp.add_argument("--temperature", type=float, default=0.7)
    sp.add_argument("--top-p", type=float, default=0.9)
    sp.add_argument("--top-k", type=int, default=0)
    sp.add_argument("--repetition-penalty", type=float, default=1.0)
    sp.add_argument("--greedy", action="store_true", help="deterministic decoding")
    sp.add_argument("--seed", type=int)


def _sampling(args):
    from lorakit.infer import Sampling

    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, repetition_penalty=args.repetition_penalty, greedy=args.greedy, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorakit", description="LoRA / QLoRA fine-tuning from one YAML config.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_: str):
        sp = sub.add_parser(name, help=help_, description=help_ + " Any config key can be overridden: --lora.r 8")
        sp.add_argument("config", help="YAML config file")
        return sp

    t = with_config("train", "Fine-tune a LoRA adapter; writes runs/<name>/.")
    t.add_argument("--resume", action="store_true",
                   help="continue runs/<name> from its newest complete checkpoint (exact: optimizer, RNG, data position)")
    t.set_defaults(func=cmd_train)
    with_config("data", "Show what training will see: counts, lengths, dropped rows, one masked example.").set_defaults(func=cmd_data)
    pl = with_config("plan", "Before training: parameters, peak memory by part (CPU and GPU), time per epoch from a "
                     "short calibration, the guide's hyper-parameters for the dataset size, and a config that fits.")
    pl.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to plan and fit for")
    pl.add_argument("--memory-gb", type=float, help="memory to fit in (default: available RAM, or the GPU's memory)")
    pl.add_argument("--processes", type=int, default=1, metavar="N",
                    help="plan for N processes (torchrun --nproc_per_node N): memory per process, effective batch")
    pl.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                    help="time a few real training steps (loads the model)")
    pl.set_defaults(func=cmd_plan)

    g = sub.add_parser("generate", help="Answer a prompt with a trained adapter (template from training).")
    g.add_argument("run", help="run folder (runs/<name>) or adapter folder")
    g.add_argument("--instruction", "-i", help="the instruction (user message)")
    g.add_argument("--input", help="optional input/context for the instruction")
    g.add_argument("--system", help="system message")
    g.add_argument("--messages", help="JSON file with a list of chat messages")
    g.add_argument("--max-new-tokens", type=int, default=256)
    _sampling_options(g)
    g.add_argument("--base", action="store_true", help="answer with the base model (adapter disabled)")
    g.add_argument("--no-stream", action="store_true", help="print the answer at the end instead of streaming")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    g.add_argument("--trust-remote-code", action="store_true")
    g.set_defaults(func=cmd_generate, overrides=[])

    e = sub.add_parser("eval", help="Score a trained adapter on held-out data: loss, perplexity, exact match, "
                       "ROUGE-L, BLEU (and JSON field accuracy); --base puts the base model beside it.")
    e.add_argument("run", help="run folder (runs/<name>) or its adapter folder")
    e.add_argument("--data", nargs="+", metavar="FILE", help="eval files (any training format); default: --split")
    e.add_argument("--split", default="validation", choices=["validation", "test"],
                   help="the run's validation split (as training made it) or its data.test files")
    e.add_argument("--base", action="store_true", help="also score the base model (prompted with the same template)")
    e.add_argument("--max-new-tokens", type=int, help="answer length limit (default: longest reference + 16)")
    e.add_argument("--batch-size", type=int, default=16, help="prompts answered per batch")
    e.add_argument("--limit", type=int, help="score only the first N examples")
    e.set_defaults(func=cmd_eval, overrides=[])

    r = sub.add_parser("runs", help="List the runs in a folder, newest first: base, template, steps, losses, "
                       "exact match, date.")
    r.add_argument("dir", nargs="?", default="runs", help="folder holding run folders (default: runs)")
    r.set_defaults(func=cmd_runs, overrides=[])

    sub.add_parser("doctor", help="Check versions, GPU/bf16, bitsandbytes, llama.cpp and disk; print fixes.") \
        .set_defaults(func=cmd_doctor)

    c = sub.add_parser("config", help="Show every config key with its type, default and help.",
                       description="Without arguments: every key with its type, default and help. --yaml: a "
                       "complete commented default config. With CONFIG (and --section.key overrides): that "
                       "config's values as commented YAML.")
    c.add_argument("config", nargs="?", help="YAML config file whose values to show")
    c.add_argument("--yaml", action="store_true", help="print a commented default config to start from")
    c.set_defaults(func=cmd_config)

    ch = sub.add_parser("chat", help="Talk with a trained adapter in the terminal: multi-turn, streamed, "
                        "with the trained template; /help inside lists the commands.")
    ch.add_argument("run", help="run folder (runs/<name>) or adapter folder")
    ch.add_argument("--system", help="system message the conversation starts with (/system changes it)")
    ch.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    ch.add_argument("--max-context", type=int,
                    help="treat the context window as N tokens (at most the model's): for long chats on a model "
                    "that degrades before its configured length, and for testing the history trimming")
    _sampling_options(ch)
    ch.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ch.add_argument("--trust-remote-code", action="store_true")
    ch.set_defaults(func=cmd_chat, overrides=[])

    rp = sub.add_parser("report", help="Write the run's report.html: curves, summary, diagnostics, base vs tuned.",
                       description="Write one self-contained HTML page (inline SVG plots, no network) for a run: "
                       "loss / eval loss, learning rate, gradient norm and tokens/s over steps; the config's "
                       "differences from the defaults; data counts and lengths; every diagnostic; and, after "
                       "`lorakit eval`, the base-vs-tuned table with sample answers. Training writes it too.")
    rp.add_argument("run", help="run folder (runs/<name>) or its adapter folder")
    rp.add_argument("--out", help="where to write it (default: RUN/report.html)")
    rp.set_defaults(func=cmd_report, overrides=[])

    m = sub.add_parser("merge", help="Merge an adapter into its base (reloaded from disk in full precision) and "
                       "check that the merged model answers as base + adapter did.")
    m.add_argument("run", help="run folder (runs/<name>) or adapter folder")
    m.add_argument("--out", required=True, help="folder for the merged model (a plain transformers folder)")
    m.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="weight dtype of the merged model (the merge itself is done in fp32)")
    m.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    m.set_defaults(func=cmd_merge, overrides=[])

    x = sub.add_parser("export", help="Export to GGUF for llama.cpp / Ollama (merged or adapter-only), verified in "
                       "llama.cpp against transformers.")
    x.add_argument("run", help="run folder (runs/<name>) or adapter folder")
    from lorakit.config import ExportConfig

    def schema(key: str) -> str:  # the flag's help is the schema's (one owner), its default the run's config
        f = ExportConfig.__dataclass_fields__[key]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        return f"{f.metadata['help']} (default: export.{key} of the run's config, else {default})"

    x.add_argument("--gguf", help=schema("gguf"))
    x.add_argument("--max-drop", type=float, metavar="POINTS", help=schema("max_drop"))
    x.add_argument("--eval-data", action="append", metavar="FILE", help=schema("eval_data") + "; repeatable")
    x.add_argument("--eval-limit", type=int, metavar="N", help=schema("eval_limit"))
    x.add_argument("--max-new-tokens", type=int, metavar="N", help=schema("max_new_tokens"))
    x.add_argument("--metric", choices=["auto", "exact_match", "json_field_accuracy", "rouge_l"], help=schema("metric"))
    x.add_argument("--imatrix", choices=["auto", "on", "off"], help=schema("imatrix"))
    x.add_argument("--imatrix-text", metavar="FILE", help=schema("imatrix_text"))
    x.add_argument("--max-size", type=float, metavar="MIB", help=schema("max_size"))
    x.add_argument("--adapter-only", action="store_true",
                   help="the base as GGUF plus the adapter in llama.cpp's LoRA format, instead of one merged file")
    x.add_argument("--ollama", action="store_true", help="also write an Ollama folder (GGUF + Modelfile)")
    x.add_argument("--out", help="output folder (default: RUN/export)")
    x.add_argument("--no-verify", action="store_true",
                   help="skip both checks in llama.cpp (token-level and task-level): the explicit way out")
    x.set_defaults(func=cmd_export, overrides=[])

    sv = sub.add_parser("serve", help="Serve the base and any number of adapters behind an OpenAI-compatible API "
                        "(continuous batching across adapters).")
    sv.add_argument("adapters", nargs="*", metavar="RUN_OR_ADAPTER", help="run or adapter folders (named after the run)")
    sv.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="an adapter under a chosen name")
    sv.add_argument("--base", help="the base model (must be the one the adapters were trained on)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (a non-loopback one wants an API key)")
    sv.add_argument("--port", type=int, default=8000)
    key = sv.add_mutually_exclusive_group()
    key.add_argument("--api-key", help="require Authorization: Bearer KEY (prefer --api-key-file: argv is visible)")
    key.add_argument("--api-key-file", help="file holding the API key")
    sv.add_argument("--allow-adapter-loading", action="store_true",
                    help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter")
    sv.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                    help="folder runtime loads may read from (repeatable)")
    sv.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    sv.add_argument("--max-queue", type=int, default=256, help="requests waiting before 429")
    sv.add_argument("--max-tokens-cap", type=int, default=4096, help="the largest max_tokens a request may ask")
    sv.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    sv.set_defaults(func=cmd_serve, overrides=[])

    d = sub.add_parser("demo", help="Fine-tune SmolLM2-135M on the bundled support data and compare with the base.")
    d.add_argument("--output-dir", default="runs", help="folder for the demo run")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command in ("generate", "eval", "runs", "chat", "report", "merge", "export", "serve"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    _quiet_libraries()
    try:
        return args.func(args)
    except LorakitError as e:
        if args.debug:
            raise
        print(f"error: {e.render()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
