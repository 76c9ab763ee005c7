"""Run a multi-process ``torchrun`` command from a test.

Each run gets its own session, so a timeout kills torchrun's workers too. Gloo has a known exit race:
when the process group is torn down, a worker can abort in C++ with "terminate called without an
active exception" after all of its Python work is done (pytorch/pytorch#190489). On a loaded machine
this happened once in about 25 runs here. A run that failed with exactly that signature is run
once more; every other failure is returned as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

GLOO_EXIT_ABORT = "terminate called without an active exception"


def _run_once(cmd: list[str], env: dict, timeout: float, cwd) -> tuple[int, str]:
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, out.decode(errors="replace")


def run_torchrun(cmd: list[str], env: dict | None = None, timeout: float = 120, cwd=None,
                 outputs: Sequence[Path] = ()) -> tuple[int, str]:
    """``(returncode, stdout + stderr)`` of ``cmd``, retried once after a gloo exit abort (the
    ``outputs`` folders are removed first, so the retry starts from scratch)."""
    env = dict(os.environ) if env is None else env
    code, out = _run_once(cmd, env, timeout, cwd)
    if code != 0 and GLOO_EXIT_ABORT in out:
        for path in outputs:
            shutil.rmtree(path, ignore_errors=True)
        code, out = _run_once(cmd, env, timeout, cwd)
    return code, out


def json_records(out: str, key: str) -> list[dict]:
    """The JSON objects holding ``key`` among the lines of ``out`` (other lines are skipped)."""
    records = []
    for line in out.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and key in obj:
            records.append(obj)
    return records
