"""The gradient reduction of data-parallel training (solver/allreduce.py): the flat packer,
the host reducer under ``mpiexec -n 2``, and the choice between host MPI and NCCL."""

import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy
import pytest

from brewnet.layers.blob import Blob
from brewnet.solver import allreduce, mpi

ROOT = Path(__file__).resolve().parents[2]


def _blobs(shapes, dtype=numpy.float32, seed=0):
    rng = numpy.random.default_rng(seed)
    blobs = []
    for shape in shapes:
        blob = Blob(shape, dtype=dtype)
        blob.diff[...] = rng.normal(size=shape)
        blobs.append(blob)
    return blobs


# -- the packer ------------------------------------------------------------------------

def test_diffs_become_views_of_one_buffer_and_keep_their_values():
    blobs = _blobs([(3, 2, 2), (5,), (2, 7)])
    before = [b.diff.copy() for b in blobs]
    flat = allreduce.FlatGradients(blobs)
    assert len(flat.groups) == 1
    buffer, count, _ = flat.groups[0]
    assert count == flat.count == 12 + 5 + 14 and buffer.shape == (count,)
    assert flat.nbytes == count * 4
    for blob, old in zip(blobs, before):
        numpy.testing.assert_array_equal(blob.diff, old)
        assert numpy.shares_memory(blob.diff, buffer)
    numpy.testing.assert_array_equal(buffer[:count], numpy.concatenate([d.ravel() for d in before]))
    buffer[:count] = 2.0  # what a reduction writes, the blobs read: no copy back
    flat.scale(0.5)
    assert all((b.diff == 1.0).all() for b in blobs)


def test_gather_writes_lazy_zeros_and_takes_back_a_replaced_diff():
    blobs = _blobs([(4,), (2, 3)])
    flat = allreduce.FlatGradients(blobs)
    buffer, count, _ = flat.groups[0]
    blobs[0].clear_diff(lazy=True)  # the solver's per-iteration clear: only a flag until read
    replacement = numpy.full((2, 3), 7.0, numpy.float32)
    blobs[1].diff = replacement  # a layer that assigns a new array instead of writing in place
    flat.gather()
    numpy.testing.assert_array_equal(buffer[:count], [0] * 4 + [7] * 6)
    assert flat.copies == 1
    assert numpy.shares_memory(blobs[1].diff, buffer) and blobs[1].diff is not replacement
    flat.gather()  # back in place: no further copies
    assert flat.copies == 1


def test_one_buffer_per_dtype():
    blobs = _blobs([(3,)]) + _blobs([(2,)], dtype=numpy.float64) + _blobs([(4,)])
    flat = allreduce.FlatGradients(blobs)
    assert [(b.dtype, count, len(group)) for b, count, group in flat.groups] == [
        (numpy.float32, 7, 2), (numpy.float64, 2, 1)]
    assert flat.groups[0][0].shape == (7,) and flat.groups[1][0].shape == (2,)
    assert flat.nbytes == 7 * 4 + 2 * 8


# -- choosing the path ---------------------------------------------------------------------

def _entry(host="a", key="0", forced=False, problem=None):
    return (host, key, forced, problem)


@pytest.mark.parametrize("entries, path, reason", [
    ([_entry(key="0"), _entry(key="1")], "nccl", "own"),
    ([_entry(host="a", key="0"), _entry(host="b", key="0")], "nccl", "own"),  # GPU 0 of two machines
    ([_entry(key="0"), _entry(key="0")], "host", "share GPU 0"),
    ([_entry(key="0"), _entry(key=None)], "host", "rank 1 is on the CPU"),
    ([_entry(key=None), _entry(key=None)], "host", "CPU ranks"),
    ([_entry(key="0"), _entry(key="1", forced=True)], "host", "BREWNET_NCCL=0"),
    ([_entry(key="0"), _entry(key="1", problem="no nccl")], "host", "NCCL unusable on rank 1: no nccl"),
    ([_entry(key="0")], "host", "one rank"),
])
def test_choose_path(entries, path, reason):
    chosen, why = allreduce.choose_path(entries)
    assert chosen == path and reason in why


def test_without_cupy_a_gpu_rank_reports_nccl_unusable(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    monkeypatch.setitem(sys.modules, "cupy.cuda", None)
    host, key, forced, problem = allreduce.describe_rank("0", environ={})
    assert key == "0" and not forced and "cupy.cuda.nccl cannot be imported" in problem
    assert allreduce.describe_rank(None, environ={})[3] is None  # CPU ranks never probe
    assert allreduce.choose_path([(host, "0", False, problem), (host, "1", False, problem)])[0] == "host"


def test_brewnet_nccl_0_forces_the_host_path():
    entry = allreduce.describe_rank("0", environ={"BREWNET_NCCL": "0"})
    assert entry[2] is True and entry[3] is None
    assert allreduce.choose_path([entry, allreduce.describe_rank("1", environ={})]) == ("host", "BREWNET_NCCL=0")


class _FakeComm:
    def __init__(self, entries):
        self.entries = entries

    def allgather(self, mine):
        return [mine] + self.entries[1:]

    def bcast(self, value, root=0):
        return value


class _FakeWorld:
    def __init__(self, entries, rank=0):
        self.comm, self.rank, self.size = _FakeComm(entries), rank, len(entries)
        self.root = rank == 0


def test_select_reducer_falls_back_to_host_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(allreduce, "nccl_problem", lambda: "cupy.cuda.nccl cannot be imported (test)")
    monkeypatch.setattr(allreduce, "device_key", lambda xp: "0")
    world = _FakeWorld([None, ("x", "1", False, "cupy.cuda.nccl cannot be imported (test)")])
    with caplog.at_level(logging.INFO, logger="brewnet.solver"):
        reducer = allreduce.select_reducer(world, numpy)
    assert isinstance(reducer, allreduce.HostReducer)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "NCCL unusable on rank 0" in warnings[0]


def test_nccl_reducer_sets_up_from_rank_0s_id():
    made = {}

    class FakeNccl:
        @staticmethod
        def get_unique_id():
            return (1, 2, 3)

        class NcclCommunicator:
            def __init__(self, ndev, unique_id, rank):
                made.update(ndev=ndev, unique_id=unique_id, rank=rank)

    world = _FakeWorld([None, None])
    allreduce.NcclReducer(world, nccl=FakeNccl)
    assert made == {"ndev": 2, "unique_id": (1, 2, 3), "rank": 0}


# -- the host reducer on two ranks -------------------------------------------------------------

def _mpiexec():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    return shutil.which("mpiexec", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))


RANKS_SCRIPT = textwrap.dedent("""
    import numpy
    from brewnet.layers.blob import Blob
    from brewnet.solver import allreduce, mpi

    world = mpi.init()
    blobs = [Blob((2, 3)), Blob((4,)), Blob((3,), dtype=numpy.float64)]
    for i, blob in enumerate(blobs):
        blob.diff[...] = numpy.arange(blob.count).reshape(blob.shape) * (world.rank + 1) + i
    flat = allreduce.FlatGradients(blobs)
    reducer = allreduce.select_reducer(world, numpy)
    reducer.allreduce(flat)
    counts = allreduce.agree_requests(world, [world.rank, 5 - world.rank])
    if world.root:
        print(type(reducer).__name__, counts.tolist(), flush=True)
        for blob in blobs:
            print(" ".join(repr(float(v)) for v in blob.diff.ravel()), flush=True)
""")


@pytest.mark.skipif(_mpiexec() is None, reason="needs mpi4py and mpiexec (pip install 'brewnet[mpi]')")
def test_host_reducer_averages_over_two_ranks(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env = {k: v for k, v in env.items() if not mpi.launched({k: v})}
    result = subprocess.run([_mpiexec(), "-n", "2", sys.executable, str(script)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "HostReducer [1, 5]"  # the maximum of each count
    for i, (line, count) in enumerate(zip(lines[1:], (6, 4, 3))):
        # mean over ranks of arange * (rank + 1) + i is arange * 1.5 + i
        numpy.testing.assert_allclose([float(v) for v in line.split()], numpy.arange(count) * 1.5 + i)


# -- signals: acted on once, whichever iteration each rank saw them -------------------------------

class _ScriptedWorld:
    """Rank 0 of two; the other rank's running request counts come from a script."""

    class MPI:
        IN_PLACE, SUM, MAX = object(), "sum", "max"

    def __init__(self, others):
        self.rank, self.size, self.root, self.others, self.comm = 0, 2, True, list(others), self

    def Allreduce(self, _, buffer, op):  # noqa: N802 (mpi4py's name)
        if op == "max":
            numpy.maximum(buffer, self.others.pop(0), out=buffer)
        else:
            buffer *= 2  # the other rank holds the same gradients


class _Solver:
    def __init__(self, actions):
        from brewnet.layers.blob import BlobVec

        self.net = type("N", (), {"learnable_params": BlobVec([Blob((3,))])})()
        self.xp, self.actions, self.callbacks = numpy, list(actions), []
        self._action_function = lambda: self.actions.pop(0)

    def set_action_function(self, function):
        self.agreed = function

    def add_callback(self, on_gradients_ready):
        self.callbacks.append(on_gradients_ready)


def test_a_signal_reaching_the_ranks_an_iteration_apart_acts_once():
    # rank 0 sees SIGHUP at iteration 1, the other rank at iteration 2; then both see SIGINT at 4
    solver = _Solver(["none", "snapshot", "none", "none", "stop"])
    world = _ScriptedWorld([[0, 0], [0, 0], [1, 0], [1, 0], [1, 1]])
    parallel = mpi.DataParallel(world, solver, reducer=allreduce.HostReducer(world))
    agreed = []
    for _ in range(5):
        solver.net.learnable_params[0].diff[...] = 1.0
        solver.callbacks[0]()
        agreed.append(solver.agreed())
    assert agreed == ["none", "snapshot", "none", "none", "stop"]
    numpy.testing.assert_array_equal(solver.net.learnable_params[0].diff, 1.0)  # summed over 2, averaged
    assert parallel.bytes_per_iter == 12


def test_nccl_reducer_reduces_each_device_buffer_in_place_on_the_current_stream(monkeypatch):
    # no GPU here: a stand-in device buffer and NCCL module record what the reducer asks for
    calls = []

    class DeviceBuffer:
        def __init__(self, values):
            self.values, self.dtype = values, values.dtype
            self.data = type("Memory", (), {"ptr": 4096})()

        def __imul__(self, factor):
            calls.append(("scale", float(factor)))
            self.values *= factor
            return self

    class FakeNccl:
        NCCL_FLOAT32, NCCL_SUM = 7, 0

        @staticmethod
        def get_unique_id():
            return (1,)

        class NcclCommunicator:
            def __init__(self, ndev, unique_id, rank):
                pass

            def allReduce(self, send, recv, count, dtype, op, stream):  # noqa: N802 (NCCL's name)
                calls.append(("allReduce", send, recv, count, dtype, op, stream))

    fake_cupy = type(sys)("cupy")
    fake_cupy.cuda = type("cuda", (), {"get_current_stream": staticmethod(
        lambda: type("Stream", (), {"ptr": 99})())})
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    world = _FakeWorld([None, None])
    reducer = allreduce.NcclReducer(world, nccl=FakeNccl)
    device = DeviceBuffer(numpy.full(5, 4.0, numpy.float32))
    flat = type("Flat", (), {"groups": [(device, 5, [])]})()
    reducer.allreduce(flat)
    assert calls == [("allReduce", 4096, 4096, 5, 7, 0, 99), ("scale", 0.5)]
    numpy.testing.assert_array_equal(device.values, 2.0)
