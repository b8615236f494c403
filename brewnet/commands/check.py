"""`brewnet check` (validate a net definition) and `brewnet upgrade` (rewrite old files)."""

import contextlib

import click

from brewnet import netdef
from brewnet.netdef import caffe_pb2
from brewnet.netdef.errors import DefinitionError


@contextlib.contextmanager
def _naming(path):
    """Add ``path`` to DefinitionErrors raised without one (e.g. by filter_net)."""
    try:
        yield
    except DefinitionError as exc:
        if exc.path is not None:
            raise
        raise DefinitionError(exc.reason, path) from None


# -- loading a definition of either kind ------------------------------------------------

def _load_any(path):
    """(kind, message, was_text): a net or solver from text, or a net from binary or
    HDF5 weights; always upgraded."""
    if netdef.is_hdf5(path):
        return "net", netdef.read_weights(path), False
    data = netdef.io.read_bytes(path)
    if data and not netdef.io.looks_like_text(data):
        return "net", netdef.read_binary_net(path), False
    return (*netdef.read_net_or_solver(path), True)


# -- graph checks --------------------------------------------------------------------------

def _count_problem(cls, layer):
    """Why the layer cannot take its blob counts, or None: the layer's own declared contract
    (Caffe's CheckBlobCounts), automatic tops included. A Python layer's counts are its
    module's business, and check does not import user code."""
    if cls.type == "Python":
        return None
    instance = cls(layer)
    return instance.blob_count_problem(len(layer.bottom), instance.tops_with_auto(len(layer.top)))


def _check_layer_type(layer, path):
    """The layer's class from the registry (an unknown type is a DefinitionError)."""
    from brewnet.layers.registry import get_layer_class

    try:
        return get_layer_class(layer.type, layer.name)
    except DefinitionError as exc:
        raise DefinitionError(exc.reason, path) from None


def _check_blobs(index, layer, produced, path):
    """Bottoms must exist already; a top may only be re-made in place (same index as its bottom)."""
    where = f"layer {layer.name!r} (#{index}, {layer.type})"
    for blob in layer.bottom:
        if blob not in produced:
            raise DefinitionError(f"{where}: bottom {blob!r} is not produced by any earlier layer", path)
    for j, blob in enumerate(layer.top):
        in_place = j < len(layer.bottom) and layer.bottom[j] == blob
        if blob in produced and not in_place:
            raise DefinitionError(f"{where}: top {blob!r} is already produced by layer "
                                  f"{produced[blob]!r} (only in-place reuse is allowed)", path)
        produced.setdefault(blob, layer.name)


def check_net(net, path):
    """Validate a filtered net: known types, blob counts, and bottom/top wiring."""
    produced = {}
    for index, layer in enumerate(net.layer):
        cls = _check_layer_type(layer, path)
        problem = _count_problem(cls, layer)
        if problem:
            raise DefinitionError(f"layer {layer.name!r} ({layer.type}): {problem}", path)
        _check_blobs(index, layer, produced, path)
    return produced


def _layer_table(net):
    """Aligned lines: name, type, bottoms -> tops."""
    rows = [(layer.name, layer.type, " ".join(layer.bottom), " ".join(layer.top)) for layer in net.layer]
    name_width = max([len("NAME")] + [len(r[0]) for r in rows])
    type_width = max([len("TYPE")] + [len(r[1]) for r in rows])
    lines = [f"{'NAME':<{name_width}}  {'TYPE':<{type_width}}  BOTTOMS -> TOPS"]
    for name, kind, bottoms, tops in rows:
        arrow = f"{bottoms} -> {tops}" if bottoms else f"-> {tops}"
        lines.append(f"{name:<{name_width}}  {kind:<{type_width}}  {arrow}")
    return lines


# -- commands -----------------------------------------------------------------------------

@click.command("check")
@click.argument("net", type=click.Path(dir_okay=False))
@click.option("--phase", type=click.Choice(["train", "test"], case_sensitive=False), default=None,
              help="Net phase (default: the file's state, TEST unless it says otherwise).")
@click.option("--stage", "stages", multiple=True, help="A NetState stage (repeatable).")
@click.option("--level", type=int, default=None, help="The NetState level.")
def check(net, phase, stages, level):
    """Parse, upgrade, filter and validate a net definition; print its layers.

    NET may be a prototxt or a binary .caffemodel; a solver file is only parsed.
    """
    kind, message, _ = _load_any(net)
    if kind == "solver":
        click.echo(f"{net}: OK: solver of type {message.type} "
                   f"(check its net files with `brewnet check NET.prototxt`)")
        return
    state = netdef.make_net_state(phase, level, stages or None, base=message.state)
    with _naming(net):
        filtered = netdef.filter_net(message, state)
    blobs = check_net(filtered, net)
    for line in _layer_table(filtered):
        click.echo(line)
    phase_name = caffe_pb2.Phase.Name(state.phase)
    click.echo(f"{net}: OK: net {filtered.name!r}, phase {phase_name}, "
               f"{len(filtered.layer)} of {len(message.layer)} layers, {len(blobs)} blobs")


_TEXT_EXTENSIONS = (".prototxt", ".txt", ".pbtxt")
_BINARY_EXTENSIONS = (".caffemodel", ".binaryproto", ".pb")


def _output_format(out_path, input_was_text):
    """"text", "binary" or "hdf5", from OUT's extension (else the input's kind)."""
    lower = out_path.lower()
    if lower.endswith(".h5"):
        return "hdf5"
    if lower.endswith(_TEXT_EXTENSIONS):
        return "text"
    if lower.endswith(_BINARY_EXTENSIONS):
        return "binary"
    return "text" if input_was_text else "binary"


@click.command("upgrade")
@click.argument("input_path", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("output_path", metavar="OUT", type=click.Path(dir_okay=False))
def upgrade(input_path, output_path):
    """Rewrite an old net, weights or solver file in the current format.

    OUT's extension picks the format: .prototxt/.txt text, .caffemodel/.binaryproto
    binary, .h5 HDF5 weights.
    """
    kind, message, input_was_text = _load_any(input_path)
    fmt = _output_format(output_path, input_was_text)
    if fmt == "hdf5" and kind == "solver":
        raise DefinitionError("a solver cannot be written as HDF5 weights; use .prototxt", output_path)
    if fmt == "hdf5":
        netdef.write_weights(message, output_path)
    elif fmt == "text":
        netdef.write_text(message, output_path)
    else:
        netdef.write_binary(message, output_path)
    click.echo(f"wrote {kind} {output_path} ({fmt}) from {input_path}")


COMMANDS = [check, upgrade]
