"""Every solver case real Caffe ran (caffe-reference/solvers): the loss after
each step and the final weights match Caffe's trajectory; our iteration-6
solver state matches Caffe's; resuming from Caffe's own iteration-6 snapshot
reaches Caffe's final weights."""

import json
import shutil

import numpy
import pytest

from brewnet import netdef, solver
from brewnet.layers.kernels.backend import to_numpy

CASES = ["sgd_fixed", "sgd_momentum_step_l2", "sgd_l1_inv", "sgd_multistep_clip", "sgd_iter_size_exp", "sgd_poly",
         "sgd_sigmoid", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "legacy_enum_adagrad", "multipliers"]
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture
def solvers_dir(fixtures, tmp_path, monkeypatch):
    """A writable copy of caffe-reference/solvers (the solvers snapshot into it), as the current folder."""
    source = fixtures / "caffe-reference" / "solvers"
    work = tmp_path / "solvers"
    shutil.copytree(source, work)
    for path in [work, *work.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    monkeypatch.chdir(work)
    return work


def test_manifest_lists_every_case(fixtures):
    manifest = json.loads((fixtures / "caffe-reference" / "solvers" / "manifest.json").read_text())
    assert sorted(c["case"] for c in manifest["cases"]) == sorted(CASES)


def assert_final_weights(net, trajectory, label):
    """The net's weights against Caffe's final ones; ``label`` names the case (and device) in failures."""
    keys = [k for k in trajectory.files if k.startswith("final/")]
    assert keys
    for key in keys:
        _, layer, index = key.split("/")
        numpy.testing.assert_allclose(to_numpy(net.params[layer][int(index)].data), trajectory[key], rtol=RTOL,
                                      atol=ATOL, err_msg=f"{label}: {key}")


def check_trajectory(s, case, label):
    """12 steps from Caffe's initial weights: Caffe's losses and final weights, and our
    iteration-6 solver state holds what Caffe's does. ``s`` snapshots under ``case/ours``."""
    trajectory = numpy.load(f"{case}/trajectory.npz")
    s.net.copy_trained_layers_from("init.caffemodel")
    losses = []
    for _ in range(12):
        s.step(1)
        losses.append(float(s.net.blobs["loss"].data))
    numpy.testing.assert_allclose(losses, trajectory["loss"], rtol=RTOL, atol=ATOL, err_msg=label)
    assert_final_weights(s.net, trajectory, label)

    ours = netdef.read_solverstate(f"{case}/ours_iter_6.solverstate")
    caffe = netdef.read_solverstate(f"{case}/snap_iter_6.solverstate")
    assert (ours.iter, ours.current_step, len(ours.history)) == (caffe.iter, caffe.current_step, len(caffe.history))
    assert ours.learned_net == f"{case}/ours_iter_6.caffemodel"
    for i, (a, b) in enumerate(zip(ours.history, caffe.history)):
        numpy.testing.assert_allclose(netdef.blob_to_array(a), netdef.blob_to_array(b), rtol=RTOL, atol=ATOL,
                                      err_msg=f"{label}: history #{i}")


def check_resume(s, case, label):
    """Resuming from Caffe's own iteration-6 snapshot reaches Caffe's final weights and loss."""
    trajectory = numpy.load(f"{case}/trajectory.npz")
    s.solve(f"{case}/snap_iter_6.solverstate")
    assert s.iter == 12
    assert_final_weights(s.net, trajectory, label)
    numpy.testing.assert_allclose(float(s.net.blobs["loss"].data), trajectory["loss"][-1], rtol=RTOL, atol=ATOL,
                                  err_msg=label)


def _solver(case, prefix):
    s = solver.get_solver(f"{case}/solver.prototxt")
    s.param.snapshot_prefix = f"{case}/{prefix}"
    return s


@pytest.mark.parametrize("case", CASES)
def test_trajectory_matches_caffe(solvers_dir, case):
    check_trajectory(_solver(case, "ours"), case, case)


@pytest.mark.parametrize("case", CASES)
def test_resume_from_caffe_snapshot(solvers_dir, case):
    check_resume(_solver(case, "resumed"), case, case)
