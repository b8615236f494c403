"""Snapshot files: Caffe's naming, SolverState building and reading.

A snapshot is two files, ``PREFIX_iter_N.caffemodel`` and
``PREFIX_iter_N.solverstate`` (``.caffemodel.h5``/``.solverstate.h5`` with
snapshot_format: HDF5). netdef writes each atomically (temp file + rename),
so an interrupted snapshot never leaves a half-written file under either
name and earlier snapshots stay intact.
"""

import os

import numpy

import netdef
from layers.backend import to_numpy
from netdef import caffe_pb2
from netdef.errors import DefinitionError


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
