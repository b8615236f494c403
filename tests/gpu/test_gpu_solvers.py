"""The caffe-reference solver cases on the GPU: Caffe's loss trajectory and
final weights, our iteration-6 solver state against Caffe's, and resuming
from Caffe's own snapshot (the same checks as tests/solver, with cupy nets)."""

import numpy
import pytest
from gpu_env import gpu_mode, load_test_module, require_gpu  # noqa: F401 (gpu_mode is a fixture)

cupy = require_gpu()
pytestmark = pytest.mark.gpu
cpu_tests = load_test_module("solver/test_solver_caffe_reference.py", "brewnet_cpu_solver_reference")
CASES = cpu_tests.CASES
# the CPU tests' harness, run here on cupy nets
solvers_dir = cpu_tests.solvers_dir


def _solver(case, prefix):
    from brewnet import solver

    s = solver.get_solver(f"{case}/solver.prototxt", xp=cupy)
    assert isinstance(s.net.learnable_params[0].data, cupy.ndarray)
    s.param.snapshot_prefix = f"{case}/{prefix}"
    return s


@pytest.mark.parametrize("case", CASES)
def test_trajectory_matches_caffe_on_gpu(solvers_dir, gpu_mode, case):  # noqa: F811
    cpu_tests.check_trajectory(_solver(case, "ours"), case, f"{case} on GPU")


@pytest.mark.parametrize("case", CASES)
def test_resume_from_caffe_snapshot_on_gpu(solvers_dir, gpu_mode, case):  # noqa: F811
    cpu_tests.check_resume(_solver(case, "resumed"), case, f"{case} on GPU")


@pytest.mark.parametrize("first,second", [("gpu", "cpu"), ("cpu", "gpu")])
def test_snapshot_moves_between_devices(solvers_dir, first, second):
    """Train 6 steps on one device, snapshot, resume on the other: Caffe's final weights."""
    from brewnet import solver

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
    cpu_tests.assert_final_weights(t.net, trajectory, f"{case} on GPU")
