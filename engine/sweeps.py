"""Multirun (-m) sweeps: the summary callback (hydra.callbacks in train.yaml) and what the Optuna
sweeper shares with it. A sweep's folder (hydra.sweep.dir; default <checkpoint.root>/<run_name or
name>/multirun/<its overrides that change results>) holds its jobs' run folders, optuna.db, the
summary and .sweep_jobs/: a record per job, "running" then its status (still "running" once the
sweep is over: interrupted). A re-run of the same command is the same sweep."""

from __future__ import annotations

import atexit
import csv
import hashlib
import json
import math
import re
import statistics
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from engine.errors import EXIT_BAD_INPUT, JOB_FAILED, one_line
from engine.metrics import write_csv
from engine.run_dir import job_name, run_dir_of, write_atomic

RECORDS = ".sweep_jobs"
PRUNED = "pruned"  # a job's status (and key of its returned dict) when Optuna pruned its trial: not a failure
CV_FOLD = "cv.fold="
# Overrides (and their subkeys) that change no result: a re-run with them continues the same
# sweep and study (resume=auto, more trials, another launcher or tracker).
SAME_SWEEP = (
    "resume", "resume_mode", "debug", "trainer.device", "trainer.print_every_s", "trainer.model_summary",
    "logger", "checkpoint.async", "checkpoint.keep_last", "checkpoint.export", "checkpoint.export_pt2",
    "hydra.sweeper.n_trials", "hydra.sweeper.n_jobs", "hydra/launcher", "hydra.launcher", "hydra.sweep.dir",
)  # fmt: skip


def result_overrides(overrides: Sequence[str], ignored: tuple[str, ...] = SAME_SWEEP) -> list[str]:
    """The overrides that change results, sorted: what names a sweep and its Optuna study."""

    def kept(override: str) -> bool:
        key = override.split("=")[0].lstrip("+~")
        return not any(key == k or key.startswith(k + ".") for k in ignored)

    return sorted(filter(kept, overrides))


def sweep_folder(name: str, run_name: str | None, overrides: Sequence[str]) -> str:
    """<run_name or name>/multirun/<the overrides that change results, or 'default'>: the
    default sweep folder under checkpoint.root (train.yaml's hydra.sweep.dir), the same for
    the same command re-run (resume=auto, more trials). Long or unsafe names get a hash."""
    kept = result_overrides(overrides, (*SAME_SWEEP, "run_name", "checkpoint.root"))  # the folder's start
    text = ",".join(kept) or "default"
    safe = re.sub(r"[^\w.,=+-]", "_", text)
    if safe != text or len(safe) > 100:
        digest = hashlib.sha1("\n".join(kept).encode()).hexdigest()
        safe = f"{safe[:80]}-{digest[:8]}"
    return f"{run_name or name}/multirun/{safe}"


# train.yaml's hydra.sweep.dir: ${checkpoint.root}/${sweep_folder:${name},${run_name},${hydra.overrides.task}}
OmegaConf.register_new_resolver("sweep_folder", sweep_folder, replace=True)


def quoted(text: str) -> str:
    """`text` as a quoted Hydra override value: Hydra unescapes a backslash only before a quote,
    so those (and a trailing run, which precedes the closing quote) are doubled."""
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + text.replace("'", "\\'") + "'"


def pin_sweep_dir(config: DictConfig) -> str:
    """hydra.sweep.dir resolved once, in the sweep process, and handed to every job as an
    override (as Hydra hands on hydra.mode): a job's own overrides (one value per swept key)
    would name another folder. The command's fixed overrides, part of the sweep folder's name,
    are left out of its jobs' folder names (hydra.job.override_dirname): <sweep>/optimizer.lr=0.1."""
    sweep_dir = str(config.hydra.sweep.dir)
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    naming = config.hydra.job.config.override_dirname
    exclude = [*naming.exclude_keys, *(o.key_or_group for o in parsed if not o.is_sweep_override())]
    pinned = {
        "hydra.sweep.dir": quoted(sweep_dir),
        "hydra.job.config.override_dirname.exclude_keys": f"[{','.join(map(quoted, exclude))}]",
    }
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.sweep.dir, naming.exclude_keys = sweep_dir, exclude
        kept = [o for o in config.hydra.overrides.hydra if o.split("=")[0] not in pinned]
        config.hydra.overrides.hydra = [*kept, *(f"{k}={v}" for k, v in pinned.items())]
    return sweep_dir


def job_status(ret: JobReturn) -> tuple[str, str]:
    """A job's status ("ok", PRUNED or "failed") and why it failed: a user error the job handed
    back (train.py returns {JOB_FAILED: message}), or a bug Hydra caught."""
    result = ret._return_value
    if ret.status != JobStatus.COMPLETED:
        return "failed", f"{type(result).__name__}: {one_line(result)}"
    result = result if isinstance(result, dict) else {}
    if JOB_FAILED in result:
        return "failed", str(result[JOB_FAILED])
    return (PRUNED if result.get(PRUNED) is True else "ok"), ""


def job_run_dir(job_cfg: DictConfig, hydra_cfg: DictConfig) -> Path:
    """A job's run folder, computed as the job did (its own hydra config resolves `name`)."""
    saved = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(hydra_cfg)
    try:
        return run_dir_of(job_cfg, hydra_cfg.hydra)
    finally:
        HydraConfig.instance().cfg = saved


def best_of(run_dir: Path, monitor: str, mode: str) -> tuple[float | None, int | None]:
    """(best finite value of `monitor`, its first epoch) in the run's metrics.csv; else (None, None)."""
    found: list[tuple[float, int]] = []
    with suppress(OSError), open(run_dir / "metrics.csv", newline="") as rows:
        for row in csv.DictReader(rows):
            with suppress(KeyError, TypeError, ValueError):
                found.append((float(row[monitor]), int(row["epoch"])))
    finite = [(value, epoch) for value, epoch in found if math.isfinite(value)]
    pick = min if mode == "min" else max
    return pick(finite, key=lambda item: item[0]) if finite else (None, None)


class SweepSummary(Callback):
    """Records each job of a multirun; after each job and at the end, this sweep's records become
    summary.csv/.md/.png, and with cv=KFOLD summary_cv.csv and a mean ± std table atop summary.md."""

    def __init__(self, plot: bool = True) -> None:
        self.plot, self.sweep_dir, self.sweep = plot, None, []
        self.monitor, self.mode, self.folds = "val_loss", "min", None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(pin_sweep_dir(config)).absolute()  # jobs may chdir into theirs
        self.sweep = result_overrides(list(config.hydra.overrides.task))
        self.monitor, self.mode = str(config.checkpoint.monitor), str(config.checkpoint.mode)
        self.folds = OmegaConf.select(config, "cv.folds")
        self.basic = str(config.hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper")
        atexit.register(self.write, final=True)  # Ctrl-C, a stopped job: the summary still

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.unregister(self.write)
        rows = self.write(final=True)
        if self.basic and any(r["status"] != "ok" for r in rows):  # exit 2 as a failed run
            raise SystemExit(EXIT_BAD_INPUT)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep_dir is not None:  # else a single run
            run_dir = job_run_dir(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]), config)
            monitor, mode = str(config.checkpoint.monitor), str(config.checkpoint.mode)
            self._record(config, {"status": "running", "run_dir": str(run_dir), "monitor": monitor, "mode": mode})

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.sweep_dir is not None:
            status, error = job_status(job_return)
            self._record(config, {"status": status, "error": error})
            self.write()

    def _record(self, config: DictConfig, update: dict) -> None:
        key = job_name(config.hydra)
        path = self.sweep_dir / RECORDS / f"{key}.json"  # a job run again starts afresh:
        record = {} if update["status"] == "running" or not path.is_file() else json.loads(path.read_text())
        record.update(update, sweep=self.sweep, job=key, overrides=list(config.hydra.overrides.task))
        write_atomic(path, lambda out: out.write(json.dumps(record, indent=1) + "\n"))

    def rows(self, final: bool) -> list[dict]:
        """This sweep's jobs; a "running" job is "interrupted" once the sweep is over."""
        records = []
        for path in sorted((self.sweep_dir / RECORDS).glob("*.json")):
            with suppress(OSError, ValueError):  # unreadable or not JSON: left out
                records.append(json.loads(path.read_text()))
        return [self._row(record, final) for record in records if record.get("sweep") == self.sweep]

    def _row(self, record: dict, final: bool) -> dict:
        status = record.get("status", "failed")
        status = "interrupted" if final and status == "running" else status
        run_dir = Path(record.get("run_dir", ""))
        best, epoch = best_of(run_dir, record.get("monitor", self.monitor), record.get("mode", self.mode))
        row = {"job": record.get("job"), "overrides": " ".join(record.get("overrides", [])), "status": status}
        row.update({f"best_{self.monitor}": best, "best_epoch": epoch})
        if status in ("ok", PRUNED):
            with suppress(OSError, ValueError):  # no test_metrics.json, or a broken one
                tests = json.loads((run_dir / "test_metrics.json").read_text())
                row.update({k: v for k, v in tests.items() if k.startswith("test_")})
        best_pt = run_dir / "best.pt"
        return {**row, "best_pt": str(best_pt) if best_pt.is_file() else "", "error": record.get("error", "")}

    def write(self, final: bool = False) -> list[dict]:
        """Write summary.csv, summary.md (and the plot); the rows."""
        rows = self.rows(final) if self.sweep_dir is not None else []
        if not rows:
            return rows
        key = f"best_{self.monitor}"
        ranked = _ranked(rows, key, self.mode)
        columns = list(dict.fromkeys(k for row in ranked for k in row))
        write_csv(self.sweep_dir / "summary.csv", [{c: row.get(c) for c in columns} for row in rows])
        cv = cv_rows(rows, key, self.mode, self.folds)
        if cv:
            write_csv(self.sweep_dir / "summary_cv.csv", cv)
        head = [c for c in columns if c not in ("job", "error")] + ["error"]
        body = [[str(rank), *(_cell(row.get(c)) for c in head)] for rank, row in enumerate(ranked, 1)]
        markdown = f"# Sweep summary: sorted by {key} ({self.mode})\n\n" + _table(["rank", *head], body)
        write_atomic(self.sweep_dir / "summary.md", lambda out: out.write(_cv_markdown(cv, key) + markdown))
        if self.plot:
            _plot(ranked, key, self.sweep_dir / "summary.png")
        if final:
            bad = ", ".join(f"{r['job']} {r['status']}" for r in rows if r["status"] not in ("ok", PRUNED))
            pruned = sum(r["status"] == PRUNED for r in rows)
            verdict = (f", {pruned} pruned" if pruned else "") + (f"; not ok: {bad}" if bad else ", all ok")
            print(f"sweep summary: {self.sweep_dir}/summary.md ({len(rows)} jobs{verdict})", flush=True)
        return rows


def cv_rows(rows: list[dict], key: str, mode: str, folds: int | None = None) -> list[dict]:
    """Cross-validation: per group of jobs that differ only in cv.fold, the mean and sample std
    (ddof=1) over its completed folds of `key` (best_<monitor>) and each test_ metric; best first."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        words = row["overrides"].split()
        if any(w.startswith(CV_FOLD) for w in words):
            groups.setdefault(" ".join(w for w in words if not w.startswith(CV_FOLD)), []).append(row)
    metrics = [key, *sorted({k for r in rows for k in r if k.startswith("test_")})]
    out = []
    for overrides, jobs in groups.items():
        done = [r for r in jobs if r["status"] == "ok"]
        row = {"overrides": overrides, "folds_done": len(done), "folds": folds or len(jobs)}
        for metric in metrics:
            values = [float(r[metric]) for r in done if isinstance(r.get(metric), (int, float))]
            row[f"{metric}_mean"] = statistics.fmean(values) if values else None
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else None
        out.append(row)
    return _ranked(out, f"{key}_mean", mode)


def _ranked(rows: list[dict], key: str, mode: str) -> list[dict]:
    """Best `key` first (ascending for min), rows without a value last."""
    sign = 1 if mode == "min" else -1
    return sorted(rows, key=lambda r: (r[key] is None, (r[key] or 0.0) * sign))


def _cv_markdown(rows: list[dict], key: str) -> str:
    if not rows:
        return ""
    metrics = [c.removesuffix("_mean") for c in rows[0] if c.endswith("_mean")]
    head = ["rank", "overrides", "folds done", *(f"{m} (mean ± std)" for m in metrics)]
    body = [
        [str(rank), _cell(row["overrides"]), f"{row['folds_done']} of {row['folds']}"]
        + [f"{_cell(row[f'{m}_mean'])} ± {_cell(row[f'{m}_std'])}" for m in metrics]
        for rank, row in enumerate(rows, 1)
    ]
    return f"# Cross-validation: mean ± sample std over the completed folds, sorted by {key}\n\n{_table(head, body)}\n"


def _table(head: list[str], body: list[list[str]]) -> str:
    return "".join(f"| {' | '.join(row)} |\n" for row in [head, ["---"] * len(head), *body])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value).replace("|", "\\|")


def _plot(rows: list[dict], key: str, path: Path) -> None:
    """Bar chart of the monitored value per job; a Figure without pyplot leaves no global state."""
    from matplotlib.figure import Figure  # imported only here: it takes a second

    shown = [r for r in rows if r[key] is not None][::-1]
    fig = Figure(figsize=(8, 1.2 + 0.35 * max(len(shown), 1)))
    ax = fig.subplots()
    colors = ["tab:blue" if r["status"] == "ok" else "tab:gray" for r in shown]
    ax.barh(range(len(shown)), [r[key] for r in shown], color=colors)
    ax.set_yticks(range(len(shown)), [(r["overrides"] or r["job"])[:60] for r in shown], fontsize=7)
    ax.set_xlabel(f"{key} (gray: not ok)")
    fig.tight_layout()
    write_atomic(path, lambda out: fig.savefig(out, format="png", dpi=100), binary=True)
