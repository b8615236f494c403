"""`brewnet draw`: a picture of a net, as Caffe's python/draw_net.py draws it."""

import click

from brewnet.netdef.errors import DefinitionError

PHASES = {"ALL": None, "TRAIN": 0, "TEST": 1}


def _read_net(path):
    from brewnet import netdef

    if netdef.is_hdf5(path):
        return netdef.read_weights(path)
    data = netdef.io.read_bytes(path)
    if data and not netdef.io.looks_like_text(data):
        return netdef.read_binary_net(path)
    kind, message = netdef.read_net_or_solver(path)
    if kind == "solver":
        raise DefinitionError("this is a solver; draw one of its nets", path)
    return message


@click.command("draw")
@click.argument("input_net_proto_file", metavar="NET")
@click.argument("output_image_file", metavar="OUT.{png,svg,dot}")
@click.option("--rankdir", default="LR", show_default=True,
              help="Graphviz's direction: LR (left to right), TB (top to bottom), RL or BT.")
@click.option("--phase", type=click.Choice(sorted(PHASES), case_sensitive=False), default="ALL", show_default=True,
              help="Draw the layers of this phase only (ALL: every layer, whatever its rules).")
@click.option("--display_lrm", is_flag=True,
              help="Show the learning rate multipliers of Convolution, Deconvolution and InnerProduct layers.")
@click.option("--label_edges/--no_label_edges", default=True, show_default=True,
              help="Write batch sizes and output counts on the edges.")
def draw(input_net_proto_file, output_image_file, rankdir, phase, display_lrm, label_edges):
    """Draw a net: its layers and blobs as a graph.

    As Caffe's python/draw_net.py, with its options. OUT's extension picks the format:
    .dot (also .gv, .raw) is Graphviz's text and needs nothing; .png, .svg, .pdf and
    Graphviz's other formats need its dot program (apt-get install graphviz). NET may be
    a prototxt, a .caffemodel or zoo:NAME (its deploy net).
    """
    from brewnet import zoo
    from brewnet.netdef import draw as drawing

    rankdir = rankdir.upper()
    if rankdir not in ("LR", "RL", "TB", "BT"):
        raise DefinitionError(f"--rankdir must be one of LR, RL, TB, BT, got {rankdir!r}")
    path = zoo.resolve_model(input_net_proto_file)
    net = _read_net(path)
    click.echo(f"Drawing net to {output_image_file}")
    drawing.draw_net_to_file(net, output_image_file, rankdir, PHASES[phase.upper()], display_lrm, label_edges)


COMMANDS = [draw]
