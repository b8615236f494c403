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
