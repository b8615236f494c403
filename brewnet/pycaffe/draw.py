"""pycaffe's ``caffe.draw``: a NetParameter as a Graphviz graph (layers as boxes,
blobs as octagons), through pydot.

Needs the ``draw`` extra (``pip install 'brewnet[draw]'``, i.e. pydot) and, for
images, Graphviz's ``dot`` program; importing this module needs neither.
"""

from brewnet.netdef import caffe_pb2
from brewnet.netdef.draw import BLOB_COLOR, DEFAULT_COLOR, IN_PLACE_COLOR, TYPE_COLORS

__all__ = ["get_pooling_types_dict", "get_edge_label", "get_layer_lr_mult", "get_layer_label",
           "choose_color_by_layertype", "get_pydot_graph", "draw_net", "draw_net_to_file",
           "LAYER_STYLE_DEFAULT", "NEURON_LAYER_STYLE", "BLOB_STYLE"]

# the colours are brewnet draw's (netdef/draw.py), which are draw_net.py's
LAYER_STYLE_DEFAULT = {"shape": "record", "fillcolor": DEFAULT_COLOR, "style": "filled"}
NEURON_LAYER_STYLE = {"shape": "record", "fillcolor": IN_PLACE_COLOR, "style": "filled"}
BLOB_STYLE = {"shape": "octagon", "fillcolor": BLOB_COLOR, "style": "filled"}

_SPATIAL = ("Convolution", "Deconvolution", "Pooling")
_LEARNING = ("Convolution", "Deconvolution", "InnerProduct")


def _pydot():
    try:
        import pydot
    except ImportError:
        try:
            import pydotplus as pydot
        except ImportError:
            raise ImportError("drawing nets needs pydot: pip install 'brewnet[draw]' "
                              "(and Graphviz's dot program for images)") from None
    return pydot


def get_pooling_types_dict():
    """{PoolMethod number: its name}, e.g. {0: 'MAX', 1: 'AVE', 2: 'STOCHASTIC'}."""
    values = caffe_pb2.PoolingParameter.PoolMethod.DESCRIPTOR.values
    return {value.number: value.name for value in values}


def get_edge_label(layer):
    """The label of the edges out of a layer: the batch size of a Data layer, the
    output count of Convolution, Deconvolution and InnerProduct, else empty."""
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return '""'


def get_layer_lr_mult(layer):
    """(weights lr_mult, bias lr_mult) of a Convolution, Deconvolution or InnerProduct layer."""
    if layer.type not in _LEARNING:
        raise ValueError(f"{layer.type} layers do not have a learning rate multiplier")
    specs = list(layer.param)
    if len(specs) > 2:
        raise ValueError("Could not parse the learning rate multiplier")
    mults = [spec.lr_mult for spec in specs] + [1.0] * (2 - len(specs))
    return tuple(mults)


def get_layer_label(layer, rankdir, display_lrm=False):
    """A layer's node label: its name, (type), the kernel/stride/pad of spatial layers and,
    with ``display_lrm``, the lr multipliers; one item a line for left-right graphs
    (``rankdir`` 'LR'), spaces for top-bottom ones ('TB', 'BT'). Double-quoted."""
    separator = " " if rankdir in ("TB", "BT") else r"\n"
    if layer.type == "Pooling":
        kind = f"({layer.type} {get_pooling_types_dict()[layer.pooling_param.pool]})"
    else:
        kind = f"({layer.type})"
    parts = [layer.name, kind]
    if layer.type in _SPATIAL:
        if layer.type == "Pooling":
            p = layer.pooling_param
            kernel, stride, pad = p.kernel_size, p.stride, p.pad
        else:
            p = layer.convolution_param
            kernel = p.kernel_size[0] if len(p.kernel_size) else 1
            stride = p.stride[0] if len(p.stride) else 1
            pad = p.pad[0] if len(p.pad) else 0
        parts.append(separator.join([f"kernel size: {kernel:d}", f"stride: {stride:d}", f"pad: {pad:d}"]))
    if display_lrm and layer.type in _LEARNING:
        weights_mult, bias_mult = get_layer_lr_mult(layer)
        if weights_mult or bias_mult:
            parts.append(f"lr mult: {weights_mult:.1f}, {bias_mult:.1f}")
    return '"' + separator.join(parts) + '"'


def choose_color_by_layertype(layertype):
    """Fill colour of a layer's box: red convolutions, orange pooling, purple fully connected."""
    return TYPE_COLORS.get(layertype, DEFAULT_COLOR)


def _in_phase(layer, phase):
    """Caffe's drawing rule: a layer without include rules is in every phase."""
    if phase is None:
        return True
    if len(layer.include) and len(layer.exclude):
        raise ValueError(f"layer {layer.name} has both include and exclude specified.")
    included = not len(layer.include) or any(rule.phase == phase for rule in layer.include)
    return included and not any(rule.phase == phase for rule in layer.exclude)


def get_pydot_graph(caffe_net, rankdir, label_edges=True, phase=None, display_lrm=False):
    """A pydot.Dot of ``caffe_net`` (a NetParameter): a node per layer and per blob, an
    edge per bottom and top. ``phase`` (TRAIN/TEST) keeps that phase's layers only."""
    pydot = _pydot()
    graph = pydot.Dot(caffe_net.name or "Net", graph_type="digraph", rankdir=rankdir)
    nodes, edges = {}, []
    for layer in caffe_net.layer:
        if not _in_phase(layer, phase):
            continue
        label = get_layer_label(layer, rankdir, display_lrm=display_lrm)
        key = f"{layer.name}_{layer.type}"
        in_place = len(layer.bottom) == 1 and len(layer.top) == 1 and layer.bottom[0] == layer.top[0]
        if in_place:
            nodes[key] = pydot.Node(label, **NEURON_LAYER_STYLE)
        else:
            nodes[key] = pydot.Node(label, **dict(LAYER_STYLE_DEFAULT,
                                                  fillcolor=choose_color_by_layertype(layer.type)))
        # a blob's node is (re)made by each layer that names it: blobs read by a later
        # layer are octagons, a net's final outputs plain nodes, as pycaffe draws them
        for blob in layer.bottom:
            nodes[f"{blob}_blob"] = pydot.Node(blob, **BLOB_STYLE)
            edges.append((f"{blob}_blob", key, '""'))
        for blob in layer.top:
            nodes[f"{blob}_blob"] = pydot.Node(blob)
            edges.append((key, f"{blob}_blob", get_edge_label(layer) if label_edges else '""'))
    for node in nodes.values():
        graph.add_node(node)
    for src, dst, label in edges:
        graph.add_edge(pydot.Edge(nodes[src], nodes[dst], label=label))
    return graph


def draw_net(caffe_net, rankdir, ext="png", phase=None, display_lrm=False):
    """The drawing of ``caffe_net`` as bytes in format ``ext`` (png, svg, pdf, ... as
    Graphviz's dot writes them; 'raw' gives the graph's dot source)."""
    graph = get_pydot_graph(caffe_net, rankdir, phase=phase, display_lrm=display_lrm)
    if ext == "raw":
        return graph.to_string().encode()
    return graph.create(format=ext)


def draw_net_to_file(caffe_net, filename, rankdir="LR", phase=None, display_lrm=False):
    """Write the drawing of ``caffe_net`` to ``filename``, in the format its extension
    names (``.raw``: the dot source, for Graphviz by hand)."""
    from brewnet.netdef import atomic_write

    ext = filename[filename.rfind(".") + 1:]
    data = draw_net(caffe_net, rankdir, ext, phase, display_lrm)
    with atomic_write(filename) as handle:
        handle.write(data)
