"""Snapshots that cannot be lost or mismatched: one run per snapshot_prefix, a prefix
checked before iteration 0, training that outlives a failed snapshot, and resumes
that are exact or say at WARNING level why not (issue 14)."""

import errno
import json
import logging
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from brewnet import netdef, solver
from brewnet.cli import main
from brewnet.solver import snapshot as snapshots

BODY = ('base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 max_iter: 8 display: 0 snapshot: 4 '
        'snapshot_prefix: "snaps/tiny"')


def train(path, *extra):
    return CliRunner().invoke(main, ["train", "--solver", str(path), *extra])


def test_a_second_run_on_a_held_prefix_is_refused(tiny):
    (tiny.folder / "snaps").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from brewnet import netdef
        from brewnet.solver import snapshot
        param = netdef.caffe_pb2.SolverParameter(snapshot_prefix="snaps/tiny")
        with snapshot.prefix_lock(param):
            print("held", flush=True)
            sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tiny.folder)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = train(tiny.solver(BODY))
        assert result.exit_code == 1
        assert f"snapshot_prefix 'snaps/tiny' is in use by another training run (pid {holder.pid} on " in result.output
        assert "Traceback" not in result.output
        assert not list((tiny.folder / "snaps").glob("*.caffemodel"))
    finally:
        holder.communicate("\n", timeout=30)
    result = train(tiny.solver(BODY))  # the holder ended: the prefix is free again, and no lock file is left
    assert result.exit_code == 0, result.output
    assert not (tiny.folder / "snaps" / "tiny.lock").exists()


def test_solvers_of_one_process_share_the_prefix(tiny):
    path = tiny.solver(BODY)
    first, second = solver.get_solver(path), solver.get_solver(path)
    param = first.param
    with snapshots.prefix_lock(param):
        first.solve()
        second.solve()
    assert second.iter == 8


@pytest.mark.parametrize("prefix, reason", [("snaps/ti\\000ny", "NUL byte"), ("snaps/" + "x" * 300, "too long")])
def test_a_prefix_that_cannot_hold_snapshots_fails_before_training(tiny, prefix, reason):
    path = tiny.solver(BODY.replace('"snaps/tiny"', f'"{prefix}"'))
    result = train(path)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "snapshots cannot be written there" in result.output and reason in result.output.lower().replace(
        "file name too long", "too long").replace("nul byte", "NUL byte")
    assert "Iteration" not in result.output


def test_a_failed_snapshot_is_retried_and_training_goes_on(tiny, monkeypatch, caplog):
    real = netdef.write_weights
    calls = []

    def full_disk_once(proto, path):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(proto, path)

    monkeypatch.setattr(netdef, "write_weights", full_disk_once)
    s = solver.get_solver(tiny.solver(BODY))
    with caplog.at_level(logging.ERROR, logger="brewnet"):
        s.solve()
    assert s.iter == 8 and s.snapshot_failure is None
    assert "Snapshot at iteration 4 failed (No space left on device" in caplog.text
    assert (tiny.folder / "snaps" / "tiny_iter_8.caffemodel").is_file()
    assert not (tiny.folder / "snaps" / "tiny_iter_4.caffemodel").exists()


def test_a_run_whose_last_snapshot_failed_exits_non_zero(tiny, monkeypatch):
    def full_disk(proto, path):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(netdef, "write_weights", full_disk)
    result = train(tiny.solver(BODY))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "last snapshot could not be written (No space left on device" in result.output
    assert "the last one saved is none" in result.output


def test_the_sidecar_names_its_state_and_a_mismatch_warns(tiny, caplog):
    whole = solver.get_solver(tiny.solver(BODY))
    whole.solve()
    state = tiny.folder / "snaps" / "tiny_iter_8.solverstate"
    saved = json.loads((tiny.folder / "snaps" / "tiny_iter_8.solverstate.resume.json").read_text())
    assert saved["state_sha1"] == netdef.io.sha1_of_file(state)
    # a kill between writing the sidecar and renaming the state leaves another run's state under the name
    other = solver.get_solver(tiny.solver(BODY.replace("snaps/tiny", "other/tiny"), name="other.prototxt", seed=9))
    other.solve()
    (tiny.folder / "other" / "tiny_iter_8.solverstate").replace(state)
    resumed = solver.get_solver(tiny.solver(BODY, name="again.prototxt"))
    with caplog.at_level(logging.INFO, logger="brewnet"):
        resumed.restore(str(state))
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert any("was written with another tiny_iter_8.solverstate" in m and "resuming inexactly" in m
               for m in warnings), warnings


def test_a_state_without_sidecar_warns(tiny, caplog):
    whole = solver.get_solver(tiny.solver(BODY))
    whole.solve()
    (tiny.folder / "snaps" / "tiny_iter_8.solverstate.resume.json").unlink()
    resumed = solver.get_solver(tiny.solver(BODY, name="again.prototxt"))
    with caplog.at_level(logging.INFO, logger="brewnet"):
        resumed.restore("snaps/tiny_iter_8.solverstate")
    assert any(r.levelno == logging.WARNING and "resuming inexactly" in r.message for r in caplog.records)


@pytest.mark.parametrize("corrupt", [
    lambda s: s.update(smoothed_loss={"losses": "abc", "value": 1, "origin": 0}),
    lambda s: s.update(smoothed_loss=[1, 2]),
    lambda s: s.update(train_net=5),
    lambda s: s.update(test_nets="x"),
    lambda s: s.update(iter="8"),
    lambda s: s["smoothed_loss"].update(value={"a": 1}),
])
def test_a_sidecar_with_wrong_value_types_is_one_line(tiny, corrupt):
    whole = solver.get_solver(tiny.solver(BODY))
    whole.solve()
    sidecar = tiny.folder / "snaps" / "tiny_iter_8.solverstate.resume.json"
    saved = json.loads(sidecar.read_text())
    corrupt(saved)
    sidecar.write_text(json.dumps(saved))
    result = train(tiny.solver(BODY.replace("max_iter: 8", "max_iter: 10")), "--snapshot",
                   "snaps/tiny_iter_8.solverstate")
    assert result.exit_code == 1, result.output
    assert "malformed resume file: '" in result.output and "Traceback" not in result.output
