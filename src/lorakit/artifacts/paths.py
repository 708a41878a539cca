"""Where each stage's files live: the only place a run-folder (or adapter-folder) name is spelled.

tests/test_contract.py fails when one of these names appears as a string elsewhere in src/, so a
file renamed here is renamed for every reader and writer."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.artifacts.atomic import move
from lorakit.errors import LorakitError

if TYPE_CHECKING:
    from lorakit.artifacts.records import EvalSummary

# inside an adapter folder (PEFT's names, which PEFT and llama.cpp's converter look for, plus ours)
META_FILE = "lorakit.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
# inside a merged folder
PARITY_FILE = "merge_parity.json"
# inside an export folder (a run's export/ or --out): see `export_gguf` for the GGUFs
OLLAMA_DIR = "ollama"
VERIFY_SUFFIX = ".verify.json"
# inside ollama/: what the Modelfile's FROM and ADAPTER lines name
OLLAMA_MODEL = "model.gguf"
OLLAMA_ADAPTER = "adapter.gguf"
MODELFILE = "Modelfile"

ADAPTER_DIR = "adapter"
BEST_DIR = "best"
LAST_DIR = "last"
BEST_FILE = "best.json"
CHECKPOINT_STAGING = ".staging"  # inside checkpoints/
_SUMMARY_SUFFIX = ".summary.json"


@dataclass(frozen=True)
class RunPaths:
    """The files of one run folder, by what they hold."""

    root: Path

    @classmethod
    def of(cls, path: str | Path) -> "RunPaths":
        """A run folder, or its adapter folder (runs/<name>/adapter -> runs/<name>)."""
        p = Path(path)
        if p.name == ADAPTER_DIR and (p / META_FILE).exists():
            p = p.parent
        return cls(p)

    def label(self, path: Path) -> str:
        """`path` as the user knows it, relative to the run folder ('adapter/lorakit.json'; 'eval/' for a folder)."""
        rel = Path(path).relative_to(self.root).as_posix()
        return rel + "/" if Path(path) in (self.adapter, self.eval_dir, self.export_dir, self.checkpoints,
                                           self.logs, self.best, self.last) else rel

    @property
    def config(self) -> Path:
        """config.yaml: the resolved config, every `auto` filled in (lorakit.config.dump)."""
        return self.root / "config.yaml"

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER_DIR

    @property
    def best(self) -> Path:
        """best/: with train.best_by, the adapter weights at the best evaluation so far (PEFT files and
        best.json: the metric, its value and the step), kept while training, published as adapter/."""
        return self.root / BEST_DIR

    @property
    def best_record(self) -> Path:
        return self.best / BEST_FILE

    @property
    def last(self) -> Path:
        """last/: with train.best_by, the last step's adapter when an earlier evaluation was better."""
        return self.root / LAST_DIR

    @property
    def meta(self) -> Path:
        """adapter/lorakit.json: `AdapterMeta`."""
        return self.adapter / META_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def reference(self) -> Path:
        """reference_logps.json: DPO / KTO's reference log-probs of every training and validation
        example, computed once as training starts and read again on resume."""
        return self.root / "reference_logps.json"

    @property
    def rollouts(self) -> Path:
        """rollouts.jsonl: GRPO's sampled answers of one prompt, with their rewards, every
        grpo.log_samples_steps steps (and the first and last)."""
        return self.root / "rollouts.jsonl"

    @property
    def checkpoint_staging(self) -> Path:
        """checkpoints/.staging: where the Trainer writes a checkpoint before it is published whole."""
        return self.checkpoints / CHECKPOINT_STAGING

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def stage_log(self, stage: str) -> Path:
        """logs/studio-<stage>.log: the output of an eval, merge or export `lorakit studio` started."""
        return self.logs / f"studio-{stage}.log"

    @property
    def writing(self) -> Path:
        """.training: locked (artifacts.lock) by the `lorakit train` writing this run, for as long as
        it trains; a reader asks it whether the run is still going."""
        return self.root / ".training"

    @property
    def metrics(self) -> Path:
        """metrics.jsonl: one JSON object per Trainer log record (see train.callbacks.MetricsLogger)."""
        return self.root / "metrics.jsonl"

    @property
    def diagnostics(self) -> Path:
        """diagnostics.jsonl: one `Diagnostic` per line, in the order raised."""
        return self.root / "diagnostics.jsonl"

    @property
    def data(self) -> Path:
        """data.json: `lorakit.data.dataset.DataStats.to_dict()` plus the template name."""
        return self.root / "data.json"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def eval_records(self, name: str) -> Path:
        """eval/<name>.jsonl: one `EvalRecord` per example."""
        return self.eval_dir / f"{name}.jsonl"

    def eval_summary(self, name: str) -> Path:
        return self.eval_dir / f"{name}{_SUMMARY_SUFFIX}"

    def eval_summary_files(self) -> list[Path]:
        """eval/*.summary.json, by name."""
        return sorted(self.eval_dir.glob(f"*{_SUMMARY_SUFFIX}")) if self.eval_dir.is_dir() else []

    def eval_summaries(self) -> list["EvalSummary"]:
        """Every summary in eval/, oldest first."""
        from lorakit.artifacts.records import EvalSummary

        return sorted((EvalSummary.read(p) for p in self.eval_summary_files()), key=lambda s: s.created)

    @property
    def export_dir(self) -> Path:
        """export/: `lorakit export`'s default output (GGUFs, their .verify.json, ollama/)."""
        return self.root / "export"

    def verifications(self) -> list[Path]:
        """export/*.verify.json: one per exported GGUF (lorakit.export.verify.Verification), by name."""
        return sorted(self.export_dir.glob(f"*{VERIFY_SUFFIX}")) if self.export_dir.is_dir() else []

    @property
    def merge(self) -> Path:
        """merge.json: the last `lorakit merge`'s parity check (also written into the merged folder)."""
        return self.root / "merge.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"


@dataclass(frozen=True)
class StudioPaths:
    """What `lorakit studio` keeps in the runs folder it serves (`root`), under .studio/: the config
    of each run it started (what a resume reads) and that training's output."""

    root: Path

    @property
    def folder(self) -> Path:
        return self.root / ".studio"

    def config(self, run: str) -> Path:
        return self.folder / "configs" / f"{run}.yaml"

    def train_log(self, run: str) -> Path:
        return self.folder / "logs" / f"{run}.log"


@dataclass(frozen=True)
class SweepPaths:
    """The files of one sweep folder (`lorakit sweep`): the study, its trials' run folders, the result."""

    root: Path

    @property
    def marker(self) -> Path:
        """sweep.json: what the sweep searches and where its study lives; marks the folder as a sweep."""
        return self.root / "sweep.json"

    @property
    def study(self) -> Path:
        """study.db: the Optuna study (SQLite) unless sweep.storage names another."""
        return self.root / "study.db"

    @property
    def lock(self) -> Path:
        """.lock: held by the `lorakit sweep` that drives this folder's local workers."""
        return self.root / ".lock"

    @property
    def trials(self) -> Path:
        """trials/: one run folder per trial, trial-<number>."""
        return self.root / "trials"

    def trial(self, number: int) -> Path:
        return self.trials / f"trial-{number:03d}"

    @property
    def logs(self) -> Path:
        """logs/: each trial's training log (trial-<number>.log) and each worker's."""
        return self.root / "logs"

    def trial_log(self, number: int) -> Path:
        return self.logs / f"trial-{number:03d}.log"

    @property
    def best(self) -> Path:
        """best.yaml: the best trial's complete config, for `lorakit train`."""
        return self.root / "best.yaml"

    @property
    def table(self) -> Path:
        """trials.json: every trial (number, state, params, value, seconds), written after each run."""
        return self.root / "trials.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @classmethod
    def is_sweep(cls, folder: Path) -> bool:
        return cls(Path(folder)).marker.is_file()


def export_gguf(out_dir: Path, name: str, type: str, *, dynamic: bool = False) -> Path:
    """<name>-<type>[-dynamic].gguf: a model GGUF in an export folder (`dynamic`: a --max-size mix)."""
    return Path(out_dir) / f"{name}-{type}{'-dynamic' * dynamic}.gguf"


def export_lora_gguf(out_dir: Path, name: str) -> Path:
    """<name>-lora.gguf: the adapter in llama.cpp's LoRA format (--adapter-only)."""
    return Path(out_dir) / f"{name}-lora.gguf"


def imatrix_path(gguf_path: Path) -> Path:
    """<file>.imatrix.gguf beside a GGUF: the importance matrix it was quantized with."""
    p = Path(gguf_path)
    return p.with_name(f"{p.stem}.imatrix.gguf")


def verification_path(gguf_path: str | Path) -> Path:
    """Where a GGUF's verification is stored: beside it, `<file>.verify.json`."""
    p = Path(gguf_path)
    return p.with_name(p.name + VERIFY_SUFFIX)


def is_run_adapter(adapter_dir: Path) -> bool:
    """runs/<name>/adapter, as opposed to an adapter folder of its own."""
    return Path(adapter_dir).name == ADAPTER_DIR


def find_adapter_dir(path: str | Path) -> Path:
    """Accept a run folder or an adapter folder and return the adapter folder."""
    p = Path(path)
    if not p.exists():
        raise LorakitError(f"no such folder: {p}", hint="pass a run folder (runs/<name>) or its adapter/ folder")
    for candidate in (p, p / ADAPTER_DIR):
        if (candidate / PEFT_CONFIG).is_file():
            if not (candidate / META_FILE).is_file():
                raise LorakitError(
                    f"{candidate} is a PEFT adapter without {META_FILE}, so its template and base model are unknown",
                    hint="use an adapter trained by `lorakit train`, or add lorakit.json from a run that used the same base",
                )
            return candidate
    raise LorakitError(
        f"{p} holds no adapter (no {PEFT_CONFIG} in it or in {p / ADAPTER_DIR})",
        hint="train first with `lorakit train CONFIG`, or point at runs/<name>",
    )


# --------------------------------------------------------------------------- claiming a run folder


def has_work(run_dir: Path) -> bool:
    """A trained adapter or a checkpoint: something a new run must not silently destroy."""
    paths = RunPaths(Path(run_dir))
    return paths.adapter.exists() or any(paths.checkpoints.glob("checkpoint-*"))


def check_free(run_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work, to replace a finished or resumable run unless told to."""
    if run_dir.exists() and has_work(run_dir) and not overwrite:
        raise LorakitError(
            f"run folder {run_dir} already exists and holds a trained adapter or checkpoints",
            hint="continue it with `lorakit train CONFIG --resume`, choose another name (--output.name NEW), "
            "or replace it with --output.overwrite true",
        )


def claim(run_dir: Path) -> Path | None:
    """Create the run folder once everything before training has succeeded; returns the backup.

    A folder left by a run that failed before its first checkpoint holds nothing worth
    keeping and is cleared. A finished run being overwritten is moved aside, not deleted,
    and only removed once the new adapter is published (`release`), so a failed or killed
    replacement never costs the old run (`restore`).
    """
    backup = None
    if run_dir.exists() and any(run_dir.iterdir()):
        if has_work(run_dir):
            backup = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
            move(run_dir, backup)
        else:
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return backup


def restore(run_dir: Path, backup: Path | None, log) -> None:
    """The replacement failed: put the previous run back, unless the new one left checkpoints to resume."""
    if backup is None or not backup.exists():
        return
    if has_work(run_dir):
        log(f"the previous run in {run_dir} was kept at {backup}")
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    move(backup, run_dir)


def release(backup: Path | None) -> None:
    """The replacement succeeded: the previous run can go."""
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
