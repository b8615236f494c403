"""netdef: Caffe's file formats (schema, reading, writing, upgrading). No compute."""

from brewnet.netdef import caffe_pb2
from brewnet.netdef.errors import DefinitionError
from brewnet.netdef.io import (
    array_to_blob,
    atomic_write,
    blob_shape,
    blob_to_array,
    is_hdf5,
    parse_binary,
    parse_net,
    parse_solver,
    parse_text,
    read_binary,
    read_binary_net,
    read_blobproto,
    read_net,
    read_net_or_solver,
    read_solver,
    read_solverstate,
    read_text,
    read_weights,
    write_binary,
    write_blobproto,
    write_solverstate,
    write_text,
    write_weights,
)
from brewnet.netdef.state import filter_net, layer_included, make_net_state, state_meets_rule
from brewnet.netdef.upgrade import apply_default_snapshot_prefix, net_needs_upgrade, upgrade_net, upgrade_solver

__all__ = [
    "caffe_pb2", "DefinitionError",
    "array_to_blob", "atomic_write", "blob_shape", "blob_to_array", "is_hdf5",
    "parse_binary", "parse_net", "parse_solver", "parse_text",
    "read_binary", "read_binary_net", "read_blobproto", "read_net", "read_net_or_solver", "read_solver",
    "read_solverstate", "read_text", "read_weights",
    "write_binary", "write_blobproto", "write_solverstate", "write_text", "write_weights",
    "filter_net", "layer_included", "make_net_state", "state_meets_rule",
    "apply_default_snapshot_prefix", "net_needs_upgrade", "upgrade_net", "upgrade_solver",
]
