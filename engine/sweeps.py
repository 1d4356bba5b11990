"""Multirun (-m) sweeps: the summary callback (hydra.callbacks in train.yaml) and what the Optuna
sweeper shares with it. Each job leaves a record in <sweep dir>/.sweep_jobs/: "running", then "ok" or
"failed" (still "running" once the sweep is over: interrupted). After each job and at the end, this
sweep's records (a re-run of the same command is the same sweep) become summary.csv/.md/.png."""

from __future__ import annotations

import atexit
import csv
import hashlib
import json
import math
from contextlib import suppress
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from engine.config import from_start_dir
from engine.errors import EXIT_BAD_INPUT, JOB_FAILED, one_line
from engine.metrics import write_csv
from engine.run_dir import run_dir_for, run_name_for, write_atomic

RECORDS = ".sweep_jobs"
PRUNED = "pruned"  # a job's status (and key of its returned dict) when Optuna pruned its trial: not a failure
# Overrides (and their subkeys) that change no result: a re-run with them continues the same
# sweep and study (resume=auto, more trials, another launcher or tracker).
SAME_SWEEP = (
    "resume", "resume_mode", "debug", "trainer.device", "trainer.print_every_s", "trainer.model_summary",
    "logger", "checkpoint.async", "checkpoint.keep_last", "checkpoint.export", "checkpoint.export_pt2",
    "hydra.sweeper.n_trials", "hydra.sweeper.n_jobs", "hydra/launcher", "hydra.launcher", "hydra.sweep.dir",
)  # fmt: skip


def result_overrides(overrides: list[str]) -> list[str]:
    """The overrides that change results, sorted: what names a sweep and its Optuna study."""

    def same(override: str) -> bool:
        key = override.split("=")[0].lstrip("+~")
        return any(key == k or key.startswith(k + ".") for k in SAME_SWEEP)

    return sorted(o for o in overrides if not same(o))


def sweep_id(overrides: list[str]) -> str:
    return hashlib.sha1("\n".join(result_overrides(overrides)).encode()).hexdigest()[:12]


def job_error(ret: JobReturn) -> str | None:
    """Why a job failed (a user error it handed back, or a bug Hydra caught); None if ok."""
    result = ret._return_value
    if ret.status != JobStatus.COMPLETED:
        return f"{type(result).__name__}: {one_line(result)}"
    return str(result[JOB_FAILED]) if isinstance(result, dict) and JOB_FAILED in result else None


def job_pruned(ret: JobReturn) -> bool:
    """Did the job stop early on its Optuna trial's pruner (train.py returns {PRUNED: True})?"""
    result = ret._return_value
    return ret.status == JobStatus.COMPLETED and isinstance(result, dict) and result.get(PRUNED) is True


def job_run_dir(job_cfg: DictConfig, hydra_cfg: DictConfig) -> Path:
    """A job's run folder, computed as the job did (its own hydra config resolves `name`)."""
    saved = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(hydra_cfg)
    try:
        root = from_start_dir(str(job_cfg.checkpoint.root))  # hydra.job.chdir=true
        return run_dir_for(root, run_name_for(job_cfg, hydra_cfg.hydra))
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
    """Records each job of a multirun and writes the sweep's summary."""

    def __init__(self, plot: bool = True) -> None:
        self.plot, self.sweep_dir, self.sweep = plot, None, ""
        self.monitor, self.mode = "val_loss", "min"

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()  # jobs may chdir into theirs
        self.sweep = sweep_id(list(config.hydra.overrides.task))
        self.monitor, self.mode = str(config.checkpoint.monitor), str(config.checkpoint.mode)
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
            error, status = job_error(job_return), PRUNED if job_pruned(job_return) else "ok"
            self._record(config, {"status": status} if error is None else {"status": "failed", "error": error})
            self.write()

    def _record(self, config: DictConfig, update: dict) -> None:
        key = run_name_for(config, config.hydra).rpartition("/")[2]
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
        key, sign = f"best_{self.monitor}", 1 if self.mode == "min" else -1
        ranked = sorted(rows, key=lambda r: (r[key] is None, (r[key] or 0.0) * sign))
        columns = list(dict.fromkeys(k for row in ranked for k in row))
        write_csv(self.sweep_dir / "summary.csv", [{c: row.get(c) for c in columns} for row in rows])
        write_atomic(self.sweep_dir / "summary.md", lambda out: out.write(_markdown(ranked, columns, key, self.mode)))
        if self.plot:
            _plot(ranked, key, self.sweep_dir / "summary.png")
        if final:
            bad = ", ".join(f"{r['job']} {r['status']}" for r in rows if r["status"] not in ("ok", PRUNED))
            pruned = sum(r["status"] == PRUNED for r in rows)
            verdict = (f", {pruned} pruned" if pruned else "") + (f"; not ok: {bad}" if bad else ", all ok")
            print(f"sweep summary: {self.sweep_dir}/summary.md ({len(rows)} jobs{verdict})", flush=True)
        return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value).replace("|", "\\|")


def _markdown(rows: list[dict], columns: list[str], key: str, mode: str) -> str:
    head = [c for c in columns if c not in ("job", "error")] + ["error"]
    table = [["rank", *head], ["---"] * (len(head) + 1)]
    table += [[str(rank), *(_cell(row.get(c)) for c in head)] for rank, row in enumerate(rows, 1)]
    return f"# Sweep summary: sorted by {key} ({mode})\n\n" + "".join(f"| {' | '.join(r)} |\n" for r in table)


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
