"""The caffe-reference solver cases on the GPU: Caffe's loss trajectory and
final weights, our iteration-6 solver state against Caffe's, and resuming
from Caffe's own snapshot (the same checks as tests/solver, with cupy nets)."""

import shutil

import numpy
import pytest

import netdef
from gpu_env import gpu_mode, load_test_module, require_gpu  # noqa: F401 (gpu_mode is a fixture)
from layers.backend import to_numpy

cupy = require_gpu()
pytestmark = pytest.mark.gpu
cpu_tests = load_test_module("solver/test_solver_caffe_reference.py", "brewnet_cpu_solver_reference")
CASES, RTOL, ATOL = cpu_tests.CASES, cpu_tests.RTOL, cpu_tests.ATOL


@pytest.fixture
def solvers_dir(fixtures, tmp_path, monkeypatch):
    source = fixtures / "caffe-reference" / "solvers"
    work = tmp_path / "solvers"
    shutil.copytree(source, work)
    for path in [work, *work.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    monkeypatch.chdir(work)
    return work


def _solver(case, prefix):
    import solver

    s = solver.get_solver(f"{case}/solver.prototxt", xp=cupy)
    assert isinstance(s.net.learnable_params[0].data, cupy.ndarray)
    s.param.snapshot_prefix = f"{case}/{prefix}"
    return s


def _assert_final_weights(net, trajectory, case):
    keys = [k for k in trajectory.files if k.startswith("final/")]
    assert keys
    for key in keys:
        _, layer, index = key.split("/")
        numpy.testing.assert_allclose(to_numpy(net.params[layer][int(index)].data), trajectory[key], rtol=RTOL,
                                      atol=ATOL, err_msg=f"{case} on GPU: {key}")


@pytest.mark.parametrize("case", CASES)
def test_trajectory_matches_caffe_on_gpu(solvers_dir, gpu_mode, case):  # noqa: F811
    trajectory = numpy.load(f"{case}/trajectory.npz")
    s = _solver(case, "ours")
    s.net.copy_trained_layers_from("init.caffemodel")
    losses = []
    for _ in range(12):
        s.step(1)
        losses.append(float(s.net.blobs["loss"].data))
    numpy.testing.assert_allclose(losses, trajectory["loss"], rtol=RTOL, atol=ATOL, err_msg=case)
    _assert_final_weights(s.net, trajectory, case)
    ours = netdef.read_solverstate(f"{case}/ours_iter_6.solverstate")
    caffe = netdef.read_solverstate(f"{case}/snap_iter_6.solverstate")
    assert (ours.iter, ours.current_step, len(ours.history)) == (caffe.iter, caffe.current_step, len(caffe.history))
    for i, (a, b) in enumerate(zip(ours.history, caffe.history)):
        numpy.testing.assert_allclose(netdef.blob_to_array(a), netdef.blob_to_array(b), rtol=RTOL, atol=ATOL,
                                      err_msg=f"{case} on GPU: history #{i}")


@pytest.mark.parametrize("case", CASES)
def test_resume_from_caffe_snapshot_on_gpu(solvers_dir, gpu_mode, case):  # noqa: F811
    trajectory = numpy.load(f"{case}/trajectory.npz")
    s = _solver(case, "resumed")
    s.solve(f"{case}/snap_iter_6.solverstate")
    assert s.iter == 12
    _assert_final_weights(s.net, trajectory, case)


@pytest.mark.parametrize("first,second", [("gpu", "cpu"), ("cpu", "gpu")])
def test_snapshot_moves_between_devices(solvers_dir, first, second):
    """Train 6 steps on one device, snapshot, resume on the other: Caffe's final weights."""
    import solver

    case = "adam"
    trajectory = numpy.load(f"{case}/trajectory.npz")
    xps = {"gpu": cupy, "cpu": numpy}
    s = solver.get_solver(f"{case}/solver.prototxt", xp=xps[first])
    s.param.snapshot_prefix = f"{case}/{first}"
    s.net.copy_trained_layers_from("init.caffemodel")
    s.step(6)
    s.snapshot()
    t = solver.get_solver(f"{case}/solver.prototxt", xp=xps[second])
    t.param.snapshot_prefix = f"{case}/{second}"
    t.restore(f"{case}/{first}_iter_6.solverstate")
    assert isinstance(t.history[0], xps[second].ndarray)
    t.step(6)
    _assert_final_weights(t.net, trajectory, case)
