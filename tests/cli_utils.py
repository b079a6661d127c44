"""Run the command line in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None,
            entry: str = "lightning_ext") -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", entry, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
