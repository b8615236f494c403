"""Data-parallel training on a GPU (solver/allreduce.py, brewnet/launch.py): what one GPU allows.

- two ranks sharing GPU 0 (`brewnet train --ranks 2 --gpu 0`, the host path, since
  NCCL refuses two ranks on one device) train LeNet from HDF5 to the weights of
  one process at twice the batch;
- the NCCL reducer's calls (communicator from an id, in-place allReduce on the
  current stream) on a one-rank communicator.

Not checkable here: NCCL between two GPUs (no machine with several GPUs).
Skips without cupy and a CUDA device, or without mpi4py and mpiexec.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy
import pytest
from gpu_env import require_gpu

cupy = require_gpu()
pytest.importorskip("mpi4py", reason="needs mpi4py (pip install 'brewnet[mpi]')")

ROOT = Path(__file__).resolve().parents[2]
LENET = ROOT / "configs" / "lenet_hdf5" / "lenet_train_test.prototxt"


def _mpiexec():
    return shutil.which("mpiexec", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))


def _env():
    from brewnet.solver import mpi

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               BREWNET_THREADS="1")
    return {k: v for k, v in env.items() if not mpi.launched({k: v})}


def _lenet(tmp_path, batch):
    rng = numpy.random.default_rng(4)
    if not (tmp_path / "train.h5").exists():
        with h5py.File(tmp_path / "train.h5", "w") as f:
            f["data"] = rng.random((512, 1, 28, 28), dtype=numpy.float32)
            f["label"] = rng.integers(0, 10, 512).astype(numpy.float32)
        (tmp_path / "list.txt").write_text(str(tmp_path / "train.h5") + "\n")
    text = LENET.read_text()
    text = text.replace("data/lenet_hdf5/train_list.txt", str(tmp_path / "list.txt"))
    text = text.replace("data/lenet_hdf5/test_list.txt", str(tmp_path / "list.txt"))
    text = text.replace("batch_size: 64", f"batch_size: {batch}")
    (tmp_path / f"net{batch}.prototxt").write_text(text)
    solver = tmp_path / f"solver{batch}.prototxt"
    solver.write_text(f'net: "{tmp_path / f"net{batch}.prototxt"}"\ntest_iter: 1 test_interval: 1000 '
                      f'test_initialization: false\nbase_lr: 0.01 momentum: 0.9 weight_decay: 0.0005 '
                      f'lr_policy: "inv" gamma: 0.0001 power: 0.75\nmax_iter: 5 display: 1 random_seed: 1\n'
                      f'snapshot_after_train: true snapshot_prefix: "{tmp_path / f"b{batch}"}"\n')
    return str(solver)


def _weights(path):
    from brewnet import netdef

    weights = netdef.read_weights(path)
    return {layer.name: [netdef.blob_to_array(b) for b in layer.blobs] for layer in weights.layer if len(layer.blobs)}


@pytest.mark.skipif(_mpiexec() is None, reason="needs mpiexec (pip install 'brewnet[mpi]')")
def test_two_ranks_sharing_gpu_0_train_as_one_process_at_twice_the_batch(tmp_path):
    single, double = _lenet(tmp_path, 64), _lenet(tmp_path, 32)
    one = subprocess.run([sys.executable, "-m", "brewnet", "train", "--solver", single, "--gpu", "0", "--log",
                          "none"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "brewnet", "train", "--solver", double, "--ranks", "2", "--gpu",
                          "0", "--log", "none"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "Using GPU 0 (local rank 0)" in two.stderr
    assert "Gradient reduction: host MPI (ranks 0 and 1 share GPU" in two.stderr, two.stderr[-3000:]
    a, b = _weights(str(tmp_path / "b64_iter_5.caffemodel")), _weights(str(tmp_path / "b32_iter_5.caffemodel"))
    assert a.keys() == b.keys() == {"conv1", "conv2", "ip1", "ip2"}
    for name in a:
        for x, y in zip(a[name], b[name]):
            numpy.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6, err_msg=name)


NCCL_SCRIPT = textwrap.dedent("""
    import numpy
    from mpi4py import MPI
    from brewnet.layers.blob import Blob
    from brewnet.layers.kernels import backend
    from brewnet.solver import allreduce, mpi

    problem = allreduce.nccl_problem()
    if problem:
        print("NCCL-UNUSABLE", problem)
        raise SystemExit(0)
    backend.set_mode_gpu()
    backend.set_device(0)
    world = mpi.World(MPI.COMM_SELF)
    blobs = [Blob((3, 4)), Blob((5,))]
    for i, blob in enumerate(blobs):
        blob.diff[...] = backend.get_array_module().arange(blob.count).reshape(blob.shape) + i
    flat = allreduce.FlatGradients(blobs)
    reducer = allreduce.NcclReducer(world)
    reducer.allreduce(flat)
    backend.get_array_module().cuda.get_current_stream().synchronize()
    ok = all(numpy.array_equal(backend.to_numpy(b.diff), numpy.arange(b.count).reshape(b.shape) + i)
             for i, b in enumerate(blobs))
    print("NCCL-OK" if ok else "NCCL-WRONG", allreduce.device_key(backend.get_array_module()))
""")


def test_nccl_reducer_on_a_one_rank_communicator(tmp_path):
    script = tmp_path / "nccl_one.py"
    script.write_text(NCCL_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    if "NCCL-UNUSABLE" in result.stdout:
        pytest.skip(result.stdout.strip())
    assert "NCCL-OK" in result.stdout, result.stdout + result.stderr[-2000:]
