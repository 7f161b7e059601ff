"""Metrics to CSV (one file per stream) and TensorBoard."""

from __future__ import annotations

import csv
from pathlib import Path


class MetricsLogger:
    """Appends rows to ``<dir>/<stream>.csv`` and scalars to TensorBoard.

    On resume, ``truncate_after(step)`` drops rows logged after the checkpoint, so a killed and
    resumed run leaves the same CSV as an uninterrupted one.
    """

    def __init__(self, out_dir: str | Path, tensorboard: bool = True) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tb"))
            except ImportError:  # tensorboard not installed: CSV only
                self._tb = None

    def log(self, stream: str, step: int, values: dict[str, float]) -> None:
        path = self.dir / f"{stream}.csv"
        row = {"step": step, **values}
        new = not path.exists()
        if not new:
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            if header != list(row):
                raise ValueError(f"{path}: columns changed from {header} to {list(row)}")
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{stream}/{k}", v, step)

    def truncate_after(self, step: int) -> None:
        for path in self.dir.glob("*.csv"):
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            kept = rows[:1] + [r for r in rows[1:] if int(r[0]) <= step]
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows(kept)

    def read(self, stream: str) -> list[dict[str, float]]:
        path = self.dir / f"{stream}.csv"
        if not path.exists():
            return []
        with open(path, newline="") as f:
            return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
