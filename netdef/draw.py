"""Pictures of nets: a NetParameter as a Graphviz graph, drawn the way Caffe's
python/draw_net.py draws it (layers as coloured boxes, blobs as grey octagons, the
batch size or output count on a layer's outgoing edges), written as DOT text without
any dependency, or as PNG/SVG/PDF... by Graphviz's ``dot`` program.

Unlike caffe.draw, layers that share a name stay separate nodes (mnist_autoencoder's
three "data" layers), labels are escaped (a '|' or '{' in a name cannot break the
record), and kernels given as kernel_h/kernel_w are shown as HxW.
"""

import os
import shutil
import subprocess

from brewnet.netdef import caffe_pb2
from brewnet.netdef.errors import DefinitionError
from brewnet.netdef.io import atomic_write

DEFAULT_COLOR = "#6495ED"
TYPE_COLORS = {"Convolution": "#FF5050", "Deconvolution": "#FF5050", "Pooling": "#FF9900",
               "InnerProduct": "#CC33FF"}
IN_PLACE_COLOR = "#90EE90"
BLOB_COLOR = "#E0E0E0"
TEXT_FORMATS = ("dot", "gv", "raw")
BATCHED = {"Data": "data_param", "ImageData": "image_data_param", "HDF5Data": "hdf5_data_param",
           "WindowData": "window_data_param", "MemoryData": "memory_data_param"}
LEARNING_TYPES = ("Convolution", "Deconvolution", "InnerProduct")


def drawn_in_phase(layer, phase):
    """caffe.draw's choice: every layer when phase is None; else a layer none of whose exclude rules
    names the phase and which has no include rule or one that names the phase (or none)."""
    if phase is None:
        return True
    if len(layer.include) and len(layer.exclude):
        raise DefinitionError(f"layer {layer.name!r}: specify either include rules or exclude rules, not both")
    if len(layer.include):
        return any(not rule.HasField("phase") or rule.phase == phase for rule in layer.include)
    return not any(rule.HasField("phase") and rule.phase == phase for rule in layer.exclude)


def _quote(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _record_text(text):
    """Text safe inside a record label (its field separators escaped)."""
    for char in "\\{}|<>":
        text = text.replace(char, "\\" + char)
    return text


def _spatial(layer):
    """(kernel, stride, pad) strings of a convolution or pooling layer."""
    if layer.type == "Pooling":
        p = layer.pooling_param
        if p.global_pooling:
            return "global", "-", "-"
        kernel = (p.kernel_h, p.kernel_w) if p.kernel_h or p.kernel_w else (p.kernel_size,)
        stride = (p.stride_h, p.stride_w) if p.stride_h or p.stride_w else (p.stride,)
        pad = (p.pad_h, p.pad_w) if p.pad_h or p.pad_w else (p.pad,)
    else:
        p = layer.convolution_param
        kernel = (p.kernel_h, p.kernel_w) if p.kernel_h or p.kernel_w else tuple(p.kernel_size) or (1,)
        stride = (p.stride_h, p.stride_w) if p.stride_h or p.stride_w else tuple(p.stride) or (1,)
        pad = (p.pad_h, p.pad_w) if p.pad_h or p.pad_w else tuple(p.pad) or (0,)

    def text(values):
        return str(values[0]) if len(set(values)) == 1 else "x".join(str(v) for v in values)

    return text(kernel), text(stride), text(pad)


def lr_mults(layer):
    """The learning rate multipliers of a layer's weights and bias (1 where not given)."""
    mults = [spec.lr_mult if spec.HasField("lr_mult") else 1.0 for spec in layer.param[:2]]
    return tuple(mults + [1.0] * (2 - len(mults)))


def layer_label(layer, rankdir="LR", display_lrm=False):
    """A layer's node text: name, (type), kernel/stride/pad of spatial layers, lr multipliers."""
    separator = " " if rankdir in ("TB", "BT") else "\n"  # vertical graphs have room across, not down
    kind = layer.type
    if kind == "Pooling":
        kind += " " + caffe_pb2.PoolingParameter.PoolMethod.Name(layer.pooling_param.pool)
    parts = [layer.name, f"({kind})"]
    if layer.type in ("Convolution", "Deconvolution", "Pooling"):
        kernel, stride, pad = _spatial(layer)
        parts.append(separator.join([f"kernel size: {kernel}", f"stride: {stride}", f"pad: {pad}"]))
    if display_lrm and layer.type in LEARNING_TYPES:
        weights, bias = lr_mults(layer)
        if weights or bias:
            parts.append(f"lr mult: {weights:.1f}, {bias:.1f}")
    return separator.join(parts)


def edge_label(layer):
    """What an edge from a layer to its tops says: the batch of a data layer, the outputs of a
    convolution or fully connected layer."""
    if layer.type in BATCHED:
        return f"Batch {getattr(layer, BATCHED[layer.type]).batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return ""


def _dot_label(text):
    """A label as DOT text: lines joined by DOT's centred line break."""
    return '"' + "\\n".join(_record_text(line).replace('"', '\\"') for line in text.split("\n")) + '"'


def net_to_dot(net, rankdir="LR", phase=None, display_lrm=False, label_edges=True):
    """The DOT text of a NetParameter (``phase``: caffe_pb2.TRAIN/TEST, or None for every layer)."""
    lines = [f"digraph {_quote(net.name or 'Net')} {{", f"  rankdir={_quote(rankdir)};",
             '  node [fontname="Helvetica"]; edge [fontname="Helvetica"];']
    blobs, edges = [], []
    for index, layer in enumerate(net.layer):
        if not drawn_in_phase(layer, phase):
            continue
        node = f"layer{index}"
        in_place = len(layer.bottom) == 1 and len(layer.top) == 1 and layer.bottom[0] == layer.top[0]
        color = IN_PLACE_COLOR if in_place else TYPE_COLORS.get(layer.type, DEFAULT_COLOR)
        lines.append(f"  {node} [label={_dot_label(layer_label(layer, rankdir, display_lrm))}, shape=record, "
                     f'style=filled, fillcolor="{color}"];')
        for blob in layer.bottom:
            if blob not in blobs:
                blobs.append(blob)
            edges.append((f"blob{blobs.index(blob)}", node, ""))
        for blob in layer.top:
            if blob not in blobs:
                blobs.append(blob)
            edges.append((node, f"blob{blobs.index(blob)}", edge_label(layer) if label_edges else ""))
    for i, blob in enumerate(blobs):
        lines.append(f"  blob{i} [label={_quote(blob)}, shape=octagon, style=filled, fillcolor=\"{BLOB_COLOR}\"];")
    for source, target, label in edges:
        lines.append(f"  {source} -> {target}" + (f" [label={_quote(label)}];" if label else ";"))
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(dot_text, fmt):
    """Graphviz's drawing of DOT text in ``fmt`` (png, svg, pdf, ...), as bytes."""
    program = shutil.which("dot")
    if program is None:
        raise DefinitionError(f"drawing {fmt.upper()} needs Graphviz's dot program (e.g. apt-get install graphviz); "
                              f"a .dot file needs nothing")
    try:
        done = subprocess.run([program, f"-T{fmt}"], input=dot_text.encode("utf-8"), capture_output=True,
                              timeout=600, check=False)
    except subprocess.TimeoutExpired:
        raise DefinitionError("Graphviz's dot took more than 10 minutes") from None
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        raise DefinitionError(f"Graphviz's dot failed on format {fmt!r}: {message[-1] if message else done.returncode}")
    return done.stdout


def draw_net_to_file(net, filename, rankdir="LR", phase=None, display_lrm=False, label_edges=True):
    """Write the drawing of ``net`` to ``filename``; its extension picks the format (.dot, .gv and
    .raw are DOT text; any other is Graphviz's output format of that name). Returns the format."""
    fmt = os.path.splitext(os.fspath(filename))[1].lstrip(".").lower()
    if not fmt:
        raise DefinitionError("give the output file an extension (.png, .svg, .pdf, .dot ...)", filename)
    text = net_to_dot(net, rankdir, phase, display_lrm, label_edges)
    data = text.encode("utf-8") if fmt in TEXT_FORMATS else render(text, fmt)
    with atomic_write(filename, "wb") as f:
        f.write(data)
    return fmt
