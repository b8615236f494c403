"""The deferred loss reading (on a GPU the solver keeps each iteration's loss on the device and
reads the pending ones at display iterations, snapshots and the end of step): forced on for
numpy here, it must give the same log, losses, weights and resume files as reading every
iteration, and report divergence at the iteration it happened."""

import logging
import pathlib
import sys

import numpy
import pytest

from brewnet import solver
from brewnet.solver import TrainingDivergedError

BASE = ('base_lr: 0.1 momentum: 0.9 lr_policy: "fixed" max_iter: 11 display: 3 average_loss: 4 iter_size: 2 '
        'snapshot: 5 snapshot_prefix: "snaps/tiny"')


def train(tiny, caplog, defer, name):
    (tiny.folder / "snaps").mkdir(exist_ok=True)
    s = solver.get_solver(tiny.solver(BASE, name=f"{name}.prototxt"))
    s.defer_loss = defer
    reads = []
    if defer:
        original = s.read_losses
        s.read_losses = lambda: (reads.append((s.iter, len(s._pending_losses))), original())[1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="brewnet"):
        s.solve()
    # the display lines' rates and times differ between runs: keep every other word
    lines = [m.split(" (")[0] if "iter/s" in m else m for m in caplog.messages if "ETA" not in m]
    weights = {n: [numpy.array(b.data) for b in blobs] for n, blobs in s.net.params.items()}
    resume = (tiny.folder / "snaps" / "tiny_iter_10.solverstate.resume.json").read_text() \
        if (tiny.folder / "snaps" / "tiny_iter_10.solverstate.resume.json").exists() else None
    return lines, weights, s, reads, resume


def test_deferred_reading_changes_no_log_line_loss_or_weight(tiny, caplog):
    lines, weights, plain, _, resume = train(tiny, caplog, False, "plain")
    d_lines, d_weights, deferred, reads, d_resume = train(tiny, caplog, True, "deferred")
    assert any("loss = " in line for line in lines)
    assert d_lines == lines
    assert deferred.loss == plain.loss and deferred.smoothed_loss == plain.smoothed_loss
    assert deferred._losses == plain._losses
    for name in weights:
        for a, b in zip(weights[name], d_weights[name]):
            numpy.testing.assert_array_equal(a, b)
    assert d_resume == resume
    # read at displays (0, 3, 6, 9), before the snapshots (5, 10) and at the end, never more
    # often, with everything pending since the last read
    assert [it for it, _ in reads] == [0, 3, 5, 6, 9, 10, 11]
    assert sum(n for _, n in reads) == 11


def test_no_loss_is_read_between_displays(tiny, monkeypatch):
    s = solver.get_solver(tiny.solver('base_lr: 0.1 lr_policy: "fixed" max_iter: 6 display: 4'))
    s.defer_loss = True
    seen = []
    original = s.read_losses
    monkeypatch.setattr(s, "read_losses", lambda: (seen.append(s.iter), original())[1])
    forward_backward = s.net.forward_backward

    def checked():
        assert s.net.loss_terms is not None  # the net collects device sums instead of floats
        return forward_backward()

    monkeypatch.setattr(s.net, "forward_backward", checked)
    s.step(6)
    assert seen == [0, 4, 6]


def test_without_display_the_losses_are_read_every_max_pending_losses(tiny, monkeypatch):
    s = solver.get_solver(tiny.solver('base_lr: 0.1 lr_policy: "fixed" max_iter: 8 display: 0'))
    s.defer_loss, s.max_pending_losses = True, 3
    seen = []
    original = s.read_losses
    monkeypatch.setattr(s, "read_losses", lambda: (seen.append(len(s._pending_losses)), original())[1])
    s.step(8)
    assert seen == [3, 3, 2]
    assert isinstance(s.loss, float) and s.smoothed_loss == s.loss  # average_loss 1: the last loss


def test_deferred_divergence_names_the_iteration_it_happened(tiny):
    (tiny.folder / "snaps").mkdir()
    rng = numpy.random.default_rng(1)
    data = rng.normal(size=(16, 6)).astype(numpy.float32)
    data[9, 2] = numpy.nan  # the third batch: iteration 2
    tiny.write_data(data, rng.integers(0, 3, size=16).astype(numpy.float32))
    s = solver.get_solver(tiny.solver('base_lr: 0.1 lr_policy: "fixed" max_iter: 8 display: 4 '
                                      'snapshot_prefix: "snaps/tiny"'))
    s.defer_loss = True
    with pytest.raises(TrainingDivergedError) as info:
        s.solve()
    message = str(info.value)
    assert "\n" not in message
    assert "at iteration 2 " in message and "read at iteration 4" in message
    assert not list((tiny.folder / "snaps").iterdir())  # the weights are past the bad step: none saved


@pytest.mark.parametrize("kind", ["SGD", "Adam", "Nesterov"])
def test_training_with_the_cuda_kernels_on_the_cpu_harness_matches(tiny, monkeypatch, kind):
    """The whole loop with BREWNET_CUDA_KERNELS on, the kernels run by tests/cuda_harness.py:
    layer hooks, the fused solver step and the deferred loss together."""
    tests = str(pathlib.Path(__file__).resolve().parents[1])
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import cuda_harness

    from brewnet.layers.kernels.cuda import ops

    if not cuda_harness.have_compiler():
        pytest.skip("g++ is not installed")
    body = f'type: "{kind}" base_lr: 0.05 momentum: 0.9 weight_decay: 0.01 lr_policy: "fixed" display: 2'

    def run(on):
        monkeypatch.setenv(ops.SWITCH, "1" if on else "0")
        s = solver.get_solver(tiny.solver(body))
        s.defer_loss = on
        s.step(6)
        return s, [numpy.array(b.data) for blobs in s.net.params.values() for b in blobs]

    ref, want = run(False)
    host = cuda_harness.HostKernels()
    ops.use_host_kernels(host)
    try:
        got, weights = run(True)
    finally:
        ops.use_host_kernels(None)
    assert {f"{kind.lower()}_step", "relu_forward", "softmax_loss_backward"} <= set(host.launches)
    assert got.smoothed_loss == pytest.approx(ref.smoothed_loss, rel=1e-5)
    for a, b in zip(want, weights):
        numpy.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
