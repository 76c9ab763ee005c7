"""The torchrun test helper retries exactly once, and only after gloo's exit abort."""

from __future__ import annotations

import sys

from torchrun_util import GLOO_EXIT_ABORT, run_torchrun

SCRIPT = """
import sys
from pathlib import Path
marker, message = Path(sys.argv[1]), sys.argv[2]
n = int(marker.read_text()) if marker.exists() else 0
marker.write_text(str(n + 1))
if n == 0:
    print(message, file=sys.stderr)
    sys.exit(1)
print("ok")
"""


def test_retries_once_after_gloo_exit_abort(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "n"
    code, text = run_torchrun([sys.executable, "-c", SCRIPT, str(marker), GLOO_EXIT_ABORT], outputs=[out])
    assert code == 0 and "ok" in text and marker.read_text() == "2" and not out.exists()


def test_other_failures_are_not_retried(tmp_path):
    marker = tmp_path / "n"
    code, text = run_torchrun([sys.executable, "-c", SCRIPT, str(marker), "Traceback: real error"])
    assert code == 1 and "real error" in text and marker.read_text() == "1"
