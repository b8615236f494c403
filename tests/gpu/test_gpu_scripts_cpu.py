"""The GPU session's scripts, checked on the CPU: the benchmark fails with one
clear line without a GPU, the check script parses, LMDB stays a lazy import
(the GPU machine has no lmdb), and configs/lenet_hdf5 trains from the data
scripts/gpu_lenet_hdf5.py writes."""

import pathlib
import re
import subprocess
import sys

import numpy
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent


def _has_gpu():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.skipif(_has_gpu(), reason="a GPU is present: the no-GPU message cannot be seen")
def test_benchmark_without_gpu_is_one_clear_line():
    done = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_benchmark.py"), "--nets", "lenet"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and ("brewnet[gpu]" in lines[0] or "CUDA device" in lines[0]), done.stderr
    assert "Traceback" not in done.stderr


def test_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts/gpu_check.sh")], check=True)


def test_lmdb_is_imported_lazily():
    top_level = re.compile(r"^(import lmdb|from lmdb)", re.M)
    offenders = [str(p.relative_to(ROOT)) for folder in ("layers", "netdef", "solver", "brewnet", "zoo")
                 for p in (ROOT / folder).rglob("*.py") if top_level.search(p.read_text())]
    assert not offenders, f"module-level lmdb imports (the GPU machine has no lmdb): {offenders}"


def test_lenet_hdf5_config_trains_from_the_prepared_data(tmp_path, monkeypatch):
    from brewnet.layers.net import Net
    from brewnet.netdef import caffe_pb2

    out = tmp_path / "data" / "lenet_hdf5"
    subprocess.run([sys.executable, str(ROOT / "scripts/gpu_lenet_hdf5.py"), "--mnist", str(tmp_path / "none"),
                    "--out", str(out), "--train", "128", "--test", "100"], check=True, capture_output=True)
    monkeypatch.chdir(tmp_path)  # the list files name data/lenet_hdf5/*.h5 relative to the run folder
    for phase in (caffe_pb2.TRAIN, caffe_pb2.TEST):
        net = Net(str(ROOT / "configs/lenet_hdf5/lenet_train_test.prototxt"), phase=phase, rng=0)
        loss = net.forward()
        assert numpy.isfinite(loss) and net.blobs["data"].shape[1:] == (1, 28, 28)
        assert 0.0 <= float(net.blobs["data"].data.max()) < 1.0
