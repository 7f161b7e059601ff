"""Flower's environment: nothing downloaded or installed at run time, state under the run dir.

Must run before ``flwr`` is imported (Flower reads its telemetry switch at import time).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["flower_env"]


def flower_env(flwr_home: str | Path | None = None) -> None:
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if flwr_home is not None:
        Path(flwr_home).mkdir(parents=True, exist_ok=True)
        os.environ["FLWR_HOME"] = str(Path(flwr_home).resolve())
