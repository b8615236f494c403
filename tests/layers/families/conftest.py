"""tests/layers/families: one test file per module of brewnet/layers/families/. The
helpers they share (family_helpers.py) are imported by module name from this folder."""

import pathlib
import sys

HERE = str(pathlib.Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
