"""kill -9 during training and during each snapshot file, then resume: the script's
short form (the closing note quotes a longer run of it)."""

import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "kill_resume_check.py"


@pytest.mark.slow
def test_every_resume_after_kill_9_is_exact_or_says_why():
    out = subprocess.run([sys.executable, str(SCRIPT), "--kills", "6", "--seed", "2"], capture_output=True,
                         text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "6 kills:" in out.stdout and "0 silently wrong or failed" in out.stdout
    # the four files of a snapshot were each the moment of one kill
    for kind in ("weights", "state temp", "sidecar", "state"):
        assert f"'s {kind} took its name" in out.stdout
