import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


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
