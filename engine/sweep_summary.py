"""The summary of a multirun (-m) sweep: a Hydra Callback (hydra.callbacks in train.yaml).

Each job leaves a record in <sweep dir>/.sweep_jobs/ (status "running" at its start, "ok" or
"failed" at its end: a job killed or stopped in between stays "running" and is reported as
"interrupted"). After each job, at the sweep's end, and when the sweep stops early (run_main),
the records of this sweep (the same command re-run counts as the same sweep) become:

    <sweep dir>/summary.csv   one row per job: overrides, status, best monitored value and
                              epoch (metrics.csv), test metrics (test_metrics.json), best.pt
    <sweep dir>/summary.md    the same, sorted by the monitored value (checkpoint.mode)
    <sweep dir>/summary.png   the monitored value per job
"""

from __future__ import annotations

import atexit
import csv
import hashlib
import io
import json
import math
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from engine.config import from_start_dir
from engine.errors import EXIT_BAD_INPUT, JOB_FAILED, one_line
from engine.run_dir import run_dir_for, run_name_for, write_atomic

RECORDS = ".sweep_jobs"
# Overrides that do not make another sweep (re-running with resume=auto continues this one).
SAME_SWEEP = ("resume", "resume_mode", "debug", "trainer.device")


def sweep_id(overrides: list[str]) -> str:
    kept = sorted(o for o in overrides if o.split("=")[0].lstrip("+~") not in SAME_SWEEP)
    return hashlib.sha1("\n".join(kept).encode()).hexdigest()[:12]


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
    """(best value of `monitor`, its epoch) in the run's metrics.csv; (None, None) if none."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None, None
    best: tuple[float | None, int | None] = (None, None)
    with open(path, newline="") as rows:
        for row in csv.DictReader(rows):
            try:
                value, epoch = float(row[monitor]), int(row["epoch"])
            except (KeyError, TypeError, ValueError):
                continue
            if math.isfinite(value) and (best[0] is None or (
                    value < best[0] if mode == "min" else value > best[0])):
                best = (value, epoch)
    return best


class SweepSummary(Callback):
    """Records each job of a multirun and writes the sweep's summary (module docstring)."""

    def __init__(self, plot: bool = True) -> None:
        self.plot = plot
        self.sweep_dir: Path | None = None
        self.sweep: str = ""
        self.monitor, self.mode = "val_loss", "min"

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        if config.hydra.job.chdir:  # the jobs run inside their folders: keep to this one
            self.sweep_dir = self.sweep_dir.absolute()
        self.sweep = sweep_id(list(config.hydra.overrides.task))
        self.monitor = str(config.checkpoint.monitor)
        self.mode = str(config.checkpoint.mode)
        self.basic = str(config.hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper")
        self.ended = False
        atexit.register(self._stopped_early)  # Ctrl-C, a stopped job: the summary still

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.ended = True
        rows = self.write(final=True)
        failed = [r for r in rows if r["status"] != "ok"]
        if failed and self.basic:  # as a single failed run: exit 2 (after every job ran)
            raise SystemExit(EXIT_BAD_INPUT)

    def _stopped_early(self) -> None:
        if not self.ended:
            self.write(final=True)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep_dir is None:  # a single run
            return
        job_cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        run_dir = job_run_dir(job_cfg, config)
        self._record(config, {"status": "running", "run_dir": str(run_dir),
                              "monitor": str(config.checkpoint.monitor),
                              "mode": str(config.checkpoint.mode), "started": time.time()})

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.sweep_dir is None:
            return
        result = job_return._return_value
        if job_return.status == JobStatus.COMPLETED and not (
                isinstance(result, dict) and JOB_FAILED in result):
            update = {"status": "ok"}
        elif job_return.status == JobStatus.COMPLETED:
            update = {"status": "failed", "error": str(result[JOB_FAILED])}
        else:  # a bug: Hydra caught the exception
            update = {"status": "failed", "error": f"{type(result).__name__}: "
                                                   f"{one_line(result)}"}
        self._record(config, update)
        self.write()

    def _record(self, config: DictConfig, update: dict) -> None:
        if self.sweep_dir is None:
            return
        key = run_name_for(config, config.hydra).rpartition("/")[2]
        path = self.sweep_dir / RECORDS / f"{key}.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        if update.get("status") == "running":
            record = {}  # a job run again starts afresh
        record.update(update, sweep=self.sweep, job=key,
                      overrides=list(config.hydra.overrides.task))
        write_atomic(path, lambda out: out.write(json.dumps(record, indent=1) + "\n"))

    def rows(self, final: bool) -> list[dict]:
        """This sweep's jobs; a "running" job is "interrupted" once the sweep is over."""
        assert self.sweep_dir is not None
        rows = []
        for path in sorted((self.sweep_dir / RECORDS).glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if record.get("sweep") != self.sweep:
                continue
            status = record.get("status", "failed")
            if status == "running" and final:
                status = "interrupted"
            run_dir = Path(record.get("run_dir", ""))
            best, epoch = best_of(run_dir, record.get("monitor", self.monitor),
                                  record.get("mode", self.mode))
            row = {"job": record.get("job"), "overrides": " ".join(record.get("overrides", [])),
                   "status": status, f"best_{self.monitor}": best, "best_epoch": epoch}
            tests = run_dir / "test_metrics.json"
            if status == "ok" and tests.is_file():
                try:
                    row.update({k: v for k, v in json.loads(tests.read_text()).items()
                                if k.startswith("test_")})
                except ValueError:
                    pass
            best_pt = run_dir / "best.pt"
            row["best_pt"] = str(best_pt) if best_pt.is_file() else ""
            row["error"] = record.get("error", "")
            rows.append(row)
        return rows

    def write(self, final: bool = False) -> list[dict]:
        """Write summary.csv, summary.md (and the plot); the rows."""
        if self.sweep_dir is None:
            return []
        rows = self.rows(final)
        if not rows:
            return rows
        key = f"best_{self.monitor}"
        ranked = sorted(rows, key=lambda r: (r[key] is None, (r[key] or 0.0) * (
            1 if self.mode == "min" else -1)))
        columns = list(dict.fromkeys(k for row in ranked for k in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(self.sweep_dir / "summary.csv", lambda out: out.write(text.getvalue()))
        write_atomic(self.sweep_dir / "summary.md",
                     lambda out: out.write(_markdown(ranked, columns, key, self.mode)))
        if self.plot:
            _plot(ranked, key, self.sweep_dir / "summary.png")
        if final:
            bad = ", ".join(f"{r['job']} {r['status']}" for r in rows if r["status"] != "ok")
            print(f"sweep summary: {self.sweep_dir}/summary.md ({len(rows)} jobs"
                  + (f"; not ok: {bad}" if bad else ", all ok") + ")", flush=True)
        return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|")


def _markdown(rows: list[dict], columns: list[str], key: str, mode: str) -> str:
    head = [c for c in columns if c not in ("job", "error")] + ["error"]
    lines = [f"# Sweep summary: sorted by {key} ({mode})", "",
             "| rank | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for rank, row in enumerate(rows, 1):
        lines.append(f"| {rank} | " + " | ".join(_cell(row.get(c)) for c in head) + " |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], key: str, path: Path) -> None:
    """Bar chart of the monitored value per job (matplotlib imported only here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r[key] is not None]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.35 * max(len(shown), 1)))
    try:
        labels = [r["overrides"] or r["job"] for r in shown][::-1]
        colors = ["tab:blue" if r["status"] == "ok" else "tab:gray" for r in shown][::-1]
        ax.barh(range(len(shown)), [r[key] for r in shown][::-1], color=colors)
        ax.set_yticks(range(len(shown)), [label[:60] for label in labels], fontsize=7)
        ax.set_xlabel(f"{key} (gray: not ok)")
        fig.tight_layout()
        write_atomic(path, lambda out: fig.savefig(out, format="png", dpi=100), binary=True)
    finally:
        plt.close(fig)
