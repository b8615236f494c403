"""tests/gpu: GPU checks (skipped without cupy and a CUDA device) plus the
CPU run of their harness. Helpers here are imported by module name."""

import pathlib
import sys

HERE = str(pathlib.Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
