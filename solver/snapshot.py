"""Snapshot files: Caffe's naming, SolverState building and reading.

A snapshot is two files, ``PREFIX_iter_N.caffemodel`` and
``PREFIX_iter_N.solverstate`` (``.caffemodel.h5``/``.solverstate.h5`` with
snapshot_format: HDF5). netdef writes each atomically (temp file + rename),
so an interrupted snapshot never leaves a half-written file under either
name and earlier snapshots stay intact.

Beside the state, brewnet writes ``<state file>.resume.json``: the data
readers' positions, the layers' random generator states, carried recurrent
state and the smoothed-loss window, none of which Caffe saves. Resuming with
it continues exactly as the uninterrupted run; without it (a state written by
Caffe) resuming behaves as Caffe's (data from the beginning). Caffe never
reads the sidecar, so the two snapshot files stay Caffe's own.

The sidecar is written before its state takes its name and records the
state's sha1, so a kill between the two never pairs a state with a sidecar
of another moment: a resume either finds its own sidecar or says at WARNING
level that it continues as Caffe would. A run holds ``PREFIX.lock`` (an OS
file lock) so that a second run on the same snapshot_prefix is refused
instead of overwriting the first one's files.
"""

import contextlib
import datetime
import json
import os
import socket
import tempfile

import numpy

from brewnet import netdef
from brewnet.layers.kernels.backend import to_numpy
from brewnet.netdef import caffe_pb2
from brewnet.netdef.errors import DefinitionError


def filenames(param, iteration):
    """(weights path, state path) for a snapshot at ``iteration``."""
    base = f"{param.snapshot_prefix}_iter_{iteration}"
    if param.snapshot_format == caffe_pb2.SolverParameter.HDF5:
        return base + ".caffemodel.h5", base + ".solverstate.h5"
    return base + ".caffemodel", base + ".solverstate"


def build_state(iteration, learned_net, current_step, history):
    state = caffe_pb2.SolverState()
    state.iter = int(iteration)
    state.learned_net = str(learned_net)
    state.current_step = int(current_step)
    for array in history:
        state.history.append(netdef.array_to_blob(numpy.asarray(to_numpy(array), dtype=numpy.float32)))
    return state


def resolve_learned_net(learned_net, state_path):
    """Where the weights named in a solver state are.

    Caffe opens ``learned_net`` as written (relative to the current folder);
    when that fails we also try it relative to the solverstate's folder, and
    its bare file name there, so snapshot folders can be moved.
    """
    candidates = [learned_net]
    folder = os.path.dirname(os.path.abspath(state_path))
    if not os.path.isabs(learned_net):
        candidates.append(os.path.join(folder, learned_net))
    candidates.append(os.path.join(folder, os.path.basename(learned_net)))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise DefinitionError(f"learned_net: weights file '{learned_net}' not found (looked relative to the "
                          f"current folder and to {folder})", state_path)


def read_state(path):
    if not os.path.isfile(path):
        raise DefinitionError("solver state file not found", path)
    return netdef.read_solverstate(path)


RESUME_SUFFIX = ".resume.json"
RESUME_FORMAT = 1


def resume_filename(state_path):
    return os.fspath(state_path) + RESUME_SUFFIX


def write_resume(state_path, payload):
    """Write the resume sidecar of ``state_path`` atomically; returns its path."""
    path = resume_filename(state_path)
    payload = {"format": RESUME_FORMAT, **payload}
    with netdef.atomic_write(path, "w") as handle:
        json.dump(payload, handle, separators=(",", ":"))
    return path


def read_resume(state_path):
    """The sidecar of ``state_path`` as a dict, or None when there is none."""
    path = resume_filename(state_path)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
    except (OSError, ValueError) as exc:
        raise DefinitionError(f"unreadable resume file ({exc}); delete it to resume as Caffe does "
                              "(data from the beginning)", path) from None
    if not isinstance(payload, dict) or payload.get("format") != RESUME_FORMAT:
        raise DefinitionError(f"not a brewnet resume file of format {RESUME_FORMAT}; delete it to resume as "
                              "Caffe does (data from the beginning)", path)
    check_resume_payload(payload, path)
    return payload


def check_resume_payload(payload, path):
    """The sidecar's shape, checked field by field, so a damaged one is a one-line error."""
    def fail(field, expected):
        raise DefinitionError(f"malformed resume file: '{field}' must be {expected}; delete the file to resume as "
                              "Caffe does", path)

    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not isinstance(payload.get("iter"), int):
        fail("iter", "an integer")
    if not isinstance(payload.get("train_net"), dict):
        fail("train_net", "a mapping of layer names to states")
    tests = payload.get("test_nets")
    if not isinstance(tests, list) or not all(isinstance(s, dict) for s in tests):
        fail("test_nets", "a list of mappings of layer names to states")
    window = payload.get("smoothed_loss")
    if not isinstance(window, dict):
        fail("smoothed_loss", "a mapping")
    losses = window.get("losses")
    if not isinstance(losses, list) or not all(number(v) for v in losses):
        fail("smoothed_loss.losses", "a list of numbers")
    if not number(window.get("value")):
        fail("smoothed_loss.value", "a number")
    if not isinstance(window.get("origin"), int):
        fail("smoothed_loss.origin", "an integer")
    if "state_sha1" in payload and not isinstance(payload["state_sha1"], str):
        fail("state_sha1", "a string")


def write_state_with_resume(state, state_path, payload):
    """The state on a temporary name, then its sidecar (naming the state's sha1), then
    the state renamed into place: wherever a kill lands, a state under its final name
    either has its own sidecar beside it or is recognizably without one."""
    folder = os.path.dirname(os.path.abspath(state_path))
    suffix = ".tmp.h5" if os.fspath(state_path).endswith(".h5") else ".tmp"  # keeps the format choice
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(state_path) + ".", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        netdef.write_solverstate(state, tmp)
        write_resume(state_path, {**payload, "state_sha1": netdef.io.sha1_of_file(tmp)})
        os.replace(tmp, state_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def resume_matches(state_path, payload):
    """True when the sidecar was written for this very state file (older sidecars, which
    name no sha1, are trusted as before)."""
    expected = payload.get("state_sha1")
    return expected is None or expected == netdef.io.sha1_of_file(state_path)


def check_prefix_writable(param, source):
    """Write and remove a probe file with the longest name a snapshot uses (atomic_write's
    temporary name of the sidecar), so a prefix that cannot hold snapshots (a NUL byte, a
    name too long, a read-only folder) fails before iteration 0, not after training."""
    longest = resume_filename(filenames(param, max(int(param.max_iter), 1))[1])
    try:
        if "\x00" in longest:
            raise ValueError("the name holds a NUL byte")
        fd, probe = tempfile.mkstemp(prefix="." + os.path.basename(longest) + ".", suffix=".tmp",
                                     dir=os.path.dirname(os.path.abspath(longest)))
        os.close(fd)
        os.unlink(probe)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DefinitionError(f"snapshot_prefix {param.snapshot_prefix!r}: snapshots cannot be written there "
                              f"({reason})", source) from None


# -- one run per snapshot_prefix -------------------------------------------------------

_HELD = {}  # lock file -> [open file, how many holds in this process]


class PrefixInUseError(DefinitionError):
    """Another training run holds the snapshot_prefix."""


@contextlib.contextmanager
def prefix_lock(param):
    """Hold ``PREFIX.lock`` (an OS lock, gone with the process) while the block runs; the
    solve loop holds it for the whole run. Holds nest within a process; another process
    holding it makes this raise PrefixInUseError naming that process."""
    path = os.path.abspath(param.snapshot_prefix + ".lock")
    if path not in _HELD:
        handle = _acquire(path, param.snapshot_prefix)
        if handle is None:  # no POSIX locks here (Windows): runs are not guarded
            yield
            return
        _HELD[path] = [handle, 0]
    _HELD[path][1] += 1
    try:
        yield
    finally:
        entry = _HELD[path]
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[path]
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still locked, so no one locks the old file meanwhile
            entry[0].close()


def _acquire(path, prefix):
    try:
        import fcntl
    except ImportError:
        return None
    while True:
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise PrefixInUseError(f"snapshot_prefix {prefix!r} is in use by another training run ({holder}); "
                                   "wait for it to end or give this run its own snapshot_prefix") from None
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its holder removed while we waited to open it
            break
        handle.close()
    handle.seek(0)
    handle.truncate()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n")
    handle.flush()
    return handle
