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
"""

import json
import os

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
    return payload
