"""Shared by the scripts the distributed tests launch: how a rank reports a failure, and how it exits."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path


def write_error(out: Path, err: BaseException) -> int:
    """Write this rank's failure to ``out/error<rank>.txt`` (the test reads it); returns the exit code 3."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"error{os.environ.get('LOCAL_RANK', '0')}.txt").write_text(
        f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
    return 3


def exit_now(rc: int) -> None:
    """Tear the process group down and leave through ``os._exit``: gloo in torch 2.13 otherwise aborts at
    interpreter exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
