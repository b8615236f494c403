"""Solver behaviour on a tiny synthetic net: seeds, resuming, snapshots
(formats, atomicity), divergence, signals, testing and file errors."""

import logging
import signal

import numpy
import pytest

from brewnet import netdef, solver
from brewnet.netdef.errors import DefinitionError
from brewnet.solver import SignalHandler, TrainingDivergedError

BASE = 'base_lr: 0.1 lr_policy: "fixed" max_iter: 8 display: 0 snapshot: 4 snapshot_prefix: "snaps/tiny"'


def weights_of(s):
    return {name: [numpy.array(b.data) for b in blobs] for name, blobs in s.net.params.items()}


def run_losses(s, n):
    out = []
    for _ in range(n):
        s.step(1)
        out.append(float(s.net.blobs["loss"].data))
    return out


def test_same_seed_same_losses_and_different_seed_differs(tiny):
    (tiny.folder / "snaps").mkdir()
    path = tiny.solver(BASE)
    first = run_losses(solver.get_solver(path), 5)
    second = run_losses(solver.get_solver(path), 5)
    assert first == second
    other = tiny.solver(BASE, name="other.prototxt", seed=11)
    assert run_losses(solver.get_solver(other), 5) != first


@pytest.mark.parametrize("kind, extra", [
    ("SGD", 'momentum: 0.9 lr_policy: "multistep" gamma: 0.5 stepvalue: 2 stepvalue: 5 stepvalue: 6'),
    ("Adam", "momentum: 0.9"),
    ("AdaDelta", "momentum: 0.9 delta: 1e-4"),
    ("Nesterov", "momentum: 0.9 weight_decay: 0.01"),
])
@pytest.mark.parametrize("fmt", ["BINARYPROTO", "HDF5"])
def test_resume_equals_uninterrupted(tiny, kind, extra, fmt):
    (tiny.folder / "snaps").mkdir()
    body = BASE.replace('lr_policy: "fixed"', "") + f' type: "{kind}" snapshot_format: {fmt} ' + extra
    if "lr_policy" not in extra:
        body += ' lr_policy: "fixed"'
    path = tiny.solver(body)
    whole = solver.get_solver(path)
    whole.solve()
    assert whole.iter == 8
    suffix = ".solverstate.h5" if fmt == "HDF5" else ".solverstate"
    assert (tiny.folder / f"snaps/tiny_iter_4{suffix}").is_file()

    resumed = solver.get_solver(path)
    resumed.param.snapshot_prefix = "snaps/again"
    resumed.solve(f"snaps/tiny_iter_4{suffix}")  # iteration 4 is an epoch boundary: same data order
    assert resumed.iter == 8
    assert resumed.current_step == whole.current_step
    for name, arrays in weights_of(whole).items():
        for a, b in zip(arrays, weights_of(resumed)[name]):
            numpy.testing.assert_array_equal(a, b, err_msg=f"{kind}: {name}")


def test_restore_finds_weights_next_to_a_moved_state(tiny):
    (tiny.folder / "snaps").mkdir()
    path = tiny.solver(BASE)
    s = solver.get_solver(path)
    s.step(4)
    moved = tiny.folder / "moved"
    moved.mkdir()
    for name in ("tiny_iter_4.caffemodel", "tiny_iter_4.solverstate"):
        (tiny.folder / "snaps" / name).rename(moved / name)
    again = solver.get_solver(path)
    again.restore(moved / "tiny_iter_4.solverstate")
    assert again.iter == 4
    numpy.testing.assert_array_equal(again.net.params["ip1"][0].data, s.net.params["ip1"][0].data)


def test_restore_errors_name_the_file(tiny):
    (tiny.folder / "snaps").mkdir()
    sgd = solver.get_solver(tiny.solver(BASE))
    sgd.step(4)
    adam = solver.get_solver(tiny.solver(BASE + ' type: "Adam"', name="adam.prototxt"))
    with pytest.raises(DefinitionError, match="tiny_iter_4.solverstate: holds 4 history blobs .* needs 8"):
        adam.restore("snaps/tiny_iter_4.solverstate")
    (tiny.folder / "snaps" / "tiny_iter_4.caffemodel").unlink()
    with pytest.raises(DefinitionError, match="learned_net: weights file 'snaps/tiny_iter_4.caffemodel' not found"):
        sgd.restore("snaps/tiny_iter_4.solverstate")


def test_interrupted_snapshot_leaves_previous_files_intact(tiny, monkeypatch):
    (tiny.folder / "snaps").mkdir()
    s = solver.get_solver(tiny.solver(BASE))
    s.step(4)
    snaps = tiny.folder / "snaps"
    before = {p.name: p.read_bytes() for p in snaps.iterdir()}
    assert set(before) == {"tiny_iter_4.caffemodel", "tiny_iter_4.solverstate", "tiny_iter_4.solverstate.resume.json"}

    def dies_halfway(message, path):
        data = message.SerializeToString()
        with netdef.atomic_write(path) as f:
            f.write(data[: len(data) // 2])
            raise OSError("No space left on device")

    # the state writer dies while re-writing the same snapshot, then while writing the next one
    monkeypatch.setattr(netdef, "write_solverstate", dies_halfway)
    with pytest.raises(OSError, match="No space"):
        s.snapshot()
    monkeypatch.setattr(netdef, "write_weights", dies_halfway)
    s.step(2)
    with pytest.raises(OSError, match="No space"):
        s.snapshot()
    after = {p.name: p.read_bytes() for p in snaps.iterdir()}
    assert after == before  # no partial file, no temp file, the old snapshot unchanged
    state = netdef.read_solverstate(snaps / "tiny_iter_4.solverstate")
    assert state.iter == 4 and len(state.history) == 4


def test_nan_loss_stops_with_a_clear_error_and_a_snapshot(tiny):
    (tiny.folder / "snaps").mkdir()
    rng = numpy.random.default_rng(1)
    data = rng.normal(size=(16, 6)).astype(numpy.float32)
    data[9, 2] = numpy.nan  # sample 9 is in the third batch: iteration 2
    tiny.write_data(data, rng.integers(0, 3, size=16).astype(numpy.float32))
    s = solver.get_solver(tiny.solver(BASE))
    with pytest.raises(TrainingDivergedError) as info:
        s.solve()
    message = str(info.value)
    assert "\n" not in message
    assert "at iteration 2" in message and "layer 'data'" in message and "snaps/tiny_iter_2.caffemodel" in message
    assert netdef.read_solverstate("snaps/tiny_iter_2.solverstate").iter == 2
    assert s.iter == 2


def test_signal_handler_maps_signals_to_actions():
    handler = SignalHandler("snapshot", "stop")
    assert handler.check() == "none"
    handler.handle(signal.SIGINT)
    handler.handle(signal.SIGHUP)
    assert handler.check() == "stop"  # SIGHUP is looked at first, as in Caffe
    assert handler.check() == "snapshot"
    assert handler.check() == "none"
    with pytest.raises(DefinitionError, match="sigint_effect: invalid signal effect 'halt'"):
        SignalHandler("halt")


def test_sigint_stop_ends_after_the_iteration_with_a_final_snapshot(tiny, caplog):
    (tiny.folder / "snaps").mkdir()
    s = solver.get_solver(tiny.solver(BASE.replace("max_iter: 8", "max_iter: 100").replace("snapshot: 4",
                                                                                         "snapshot: 50")))
    # what SIGINT did before (ignored, when the suite runs as a background job): it must be put back
    before = signal.getsignal(signal.SIGINT)
    with SignalHandler() as handler:
        s.set_action_function(handler.check)
        s.iteration_hooks.append(lambda sv: sv.iter == 3 and signal.raise_signal(signal.SIGINT))
        with caplog.at_level(logging.INFO, logger="brewnet"):
            s.solve()
    assert s.iter == 4  # the request raised during iteration 3 is seen at the end of iteration 4
    assert (tiny.folder / "snaps/tiny_iter_4.caffemodel").is_file()
    assert "Optimization stopped early." in caplog.text
    assert signal.getsignal(signal.SIGINT) is before


def test_sighup_snapshot_keeps_training(tiny):
    (tiny.folder / "snaps").mkdir()
    s = solver.get_solver(tiny.solver(BASE.replace("snapshot: 4", "snapshot: 0")))
    with SignalHandler() as handler:
        s.set_action_function(handler.check)
        s.iteration_hooks.append(lambda sv: sv.iter == 2 and signal.raise_signal(signal.SIGHUP))
        s.solve()
    assert s.iter == 8
    assert sorted(p.name for p in (tiny.folder / "snaps").iterdir()) == [
        "tiny_iter_3.caffemodel", "tiny_iter_3.solverstate", "tiny_iter_3.solverstate.resume.json",
        "tiny_iter_8.caffemodel", "tiny_iter_8.solverstate", "tiny_iter_8.solverstate.resume.json"]


def test_testing_averages_outputs_and_logs_caffe_lines(tiny, caplog):
    (tiny.folder / "snaps").mkdir()
    body = BASE.replace("display: 0", "display: 2") + " test_iter: 4 test_interval: 4 test_compute_loss: true"
    s = solver.get_solver(tiny.solver(body))
    assert len(s.test_nets) == 1 and "acc" in s.test_nets[0].outputs and "acc" not in s.net.outputs
    with caplog.at_level(logging.INFO, logger="brewnet"):
        s.solve()
    text = caplog.text
    for line in ("Iteration 0, Testing net (#0)", "Iteration 8, Testing net (#0)", "    Test net output #0: acc = ",
                 "    Test net output #1: loss = ", "(* 1 = ", "Iteration 6, lr = 0.1", "Iteration 8, loss = ",
                 "    Train net output #0: loss = ", "Snapshotting to binary proto file snaps/tiny_iter_4.caffemodel",
                 "Snapshotting solver state to binary proto file snaps/tiny_iter_8.solverstate",
                 "Optimization Done.", "Test loss: "):
        assert line in text, line
    # the averages are those of the four test batches (one epoch) with the trained weights
    results = s.test(0)
    net = s.test_nets[0]
    accs = []
    for _ in range(4):
        net.forward()
        accs.append(float(net.blobs["acc"].data))
    assert results["acc"][0] == pytest.approx(numpy.mean(accs))


def test_iter_size_two_half_batches_equal_one_full_batch(tiny):
    (tiny.folder / "snaps").mkdir()
    text = (tiny.folder / "net.prototxt").read_text()
    (tiny.folder / "net8.prototxt").write_text(text.replace("batch_size: 4", "batch_size: 8"))
    body = BASE + " momentum: 0.9 weight_decay: 0.01"
    halves = solver.get_solver(tiny.solver(body + " iter_size: 2 average_loss: 3"))
    full = solver.get_solver(tiny.solver(body, name="full.prototxt", net="net8.prototxt"))
    seen = []
    halves.iteration_hooks.append(lambda sv: seen.append(sv.loss))
    halves.step(4)
    full.step(4)
    for name, arrays in weights_of(full).items():
        for a, b in zip(arrays, weights_of(halves)[name]):
            numpy.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    # average_loss 3: the smoothed loss is the mean of the last three iteration losses
    assert len(seen) == 4 and len(set(seen)) == 4
    assert halves.smoothed_loss == pytest.approx(numpy.mean(seen[-3:]), rel=1e-6)


def test_solver_types_and_checks(tiny):
    (tiny.folder / "snaps").mkdir()
    assert type(solver.get_solver(tiny.solver(BASE))) is solver.SGDSolver
    for kind, cls in solver.SOLVER_TYPES.items():
        assert type(solver.get_solver(tiny.solver(BASE + f' type: "{kind}"', name=f"{kind}.prototxt"))) is cls
    legacy = tiny.solver(BASE + " solver_type: NESTEROV", name="legacy.prototxt")
    assert type(solver.get_solver(legacy)) is solver.NesterovSolver
    assert type(solver.SGDSolver(tiny.solver(BASE + ' type: "Adam"', name="a.prototxt"))) is solver.SGDSolver
    with pytest.raises(DefinitionError, match="unknown solver type 'Adamax'"):
        solver.get_solver(tiny.solver(BASE + ' type: "Adamax"', name="x.prototxt"))
    with pytest.raises(DefinitionError, match="momentum cannot be used with AdaGrad"):
        solver.get_solver(tiny.solver(BASE + ' type: "AdaGrad" momentum: 0.9', name="y.prototxt"))


def test_file_errors_name_solver_and_field(tiny):
    (tiny.folder / "snaps").mkdir()
    path = tiny.solver(BASE, net="missing.prototxt")
    with pytest.raises(DefinitionError, match=r"solver.prototxt: net: net file 'missing.prototxt' not found"):
        solver.get_solver(path)
    two = tiny.solver(BASE + ' train_net: "net.prototxt"', name="two.prototxt")
    with pytest.raises(DefinitionError, match=r"exactly one train net .*\(got net, train_net\)"):
        solver.get_solver(two)
    bad_prefix = tiny.solver(BASE.replace("snaps/tiny", "net.prototxt/sub/tiny"), name="p.prototxt")
    with pytest.raises(DefinitionError, match="snapshot_prefix 'net.prototxt/sub/tiny': cannot write there"):
        solver.get_solver(bad_prefix)
    # a missing snapshot folder is created
    solver.get_solver(tiny.solver(BASE.replace("snaps/tiny", "runs/a/tiny"), name="q.prototxt"))
    assert (tiny.folder / "runs" / "a").is_dir()
    no_interval = tiny.solver(BASE + " test_iter: 2", name="t.prototxt")
    with pytest.raises(DefinitionError, match="test_interval must be > 0"):
        solver.get_solver(no_interval)


def test_default_snapshot_prefix_is_the_solver_path(tiny):
    path = tiny.solver(BASE.replace(' snapshot_prefix: "snaps/tiny"', ""), name="mysolver.prototxt")
    s = solver.get_solver(path)
    assert s.param.snapshot_prefix == str(tiny.folder / "mysolver")


def test_weights_field_and_test_state(tiny):
    (tiny.folder / "snaps").mkdir()
    first = solver.get_solver(tiny.solver(BASE))
    first.step(4)
    body = BASE + ' weights: "snaps/tiny_iter_4.caffemodel" test_iter: 1 test_interval: 100 test_state { stage: "x" }'
    s = solver.get_solver(tiny.solver(body, name="ft.prototxt"))
    numpy.testing.assert_array_equal(s.net.params["ip1"][0].data, first.net.params["ip1"][0].data)
    numpy.testing.assert_array_equal(s.test_nets[0].params["ip2"][0].data, first.net.params["ip2"][0].data)
    assert list(s.test_nets[0].state.stage) == ["x"]


def test_inline_train_and_test_nets(tiny):
    (tiny.folder / "snaps").mkdir()
    net_text = (tiny.folder / "net.prototxt").read_text()
    body = (BASE + f" train_net_param {{ {net_text} }} test_net_param {{ {net_text} }} test_net: \"net.prototxt\""
            " test_iter: 2 test_iter: 3 test_interval: 4")
    path = tiny.folder / "inline.prototxt"
    path.write_text("solver_mode: CPU\n" + body)
    s = solver.get_solver(path)
    assert [n.phase for n in s.test_nets] == [1, 1]  # TEST
    assert "acc" in s.test_nets[1].outputs
    s.step(4)
    results = s.test(1)
    assert set(results) == {"acc", "loss"}
    with pytest.raises(DefinitionError, match=r"test_iter must be given once per test net \(2 test net\(s\), 1"):
        path.write_text("solver_mode: CPU\n" + body.replace(" test_iter: 3", ""))
        solver.get_solver(path)
