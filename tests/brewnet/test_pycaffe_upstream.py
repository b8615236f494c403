"""pycaffe's own unit tests (BVLC Caffe's python/caffe/test, unchanged) against
brewnet.pycaffe, one test per file, through scripts/run_pycaffe_tests.py.

They are not part of this repository: set BREWNET_PYCAFFE_TESTS to a folder of
them (inside a Caffe tree, for test_draw.py's models/ and examples/; see the
script's docstring). Without it these tests skip.
"""

import importlib.util
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FOLDER = os.environ.get("BREWNET_PYCAFFE_TESTS")
FILES = sorted(p.name for p in pathlib.Path(FOLDER).glob("test_*.py")) if FOLDER else []


def _runner():
    spec = importlib.util.spec_from_file_location("run_pycaffe_tests", ROOT / "scripts" / "run_pycaffe_tests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not FOLDER, reason="BREWNET_PYCAFFE_TESTS is not set to a folder of pycaffe's tests")
@pytest.mark.parametrize("name", FILES or ["(none)"])
def test_pycaffe_unit_tests_pass(name):
    if name == "(none)":
        pytest.fail(f"BREWNET_PYCAFFE_TESTS={FOLDER}: no test_*.py files there")
    if name == "test_draw.py":
        pytest.importorskip("pydot", reason="test_draw.py needs the draw extra (pip install 'brewnet[draw]')")
    result = _runner().run_file(pathlib.Path(FOLDER).resolve(), pathlib.Path(FOLDER, name))
    assert result["failed"] == 0 and result["ran"] > 0, result["output"]
