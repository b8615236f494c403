"""Export a Caffe net with its weights to ONNX (opset 17), built with the onnx package's helper API.

    from brewnet.onnx_export import export_onnx
    model = export_onnx(net, "net.onnx")          # net: brewnet.Net or brewnet.layers.net.Net

The exporter reads the core Net through its public attributes: the layers in order (after phase
filtering and Caffe's automatic Split insertion), their LayerParameters and parameter blobs, the
blob ids each layer reads and writes, and the shapes the Net worked out. Shapes the net fixed
(a pooling output, a crop) are taken from the Net itself, so the graph reproduces Caffe's own
rounding rather than re-deriving it.

Caffe's semantics the graph keeps:
- Pooling rounds output sizes up, and drops a last window that would start in the padding past
  the image. The end pads of MaxPool/AveragePool are set so that ONNX's floor formula gives
  exactly Caffe's size (ceil_mode is then 0 and no runtime has to agree on ceil rounding).
  AVE divides by the window clipped to image + pad: count_include_pad=1 when every window lies
  inside image + pad; otherwise the pad is made explicit (Pad with zeros) and the extra end pad
  is excluded (count_include_pad=0), which gives the same divisors.
- BatchNorm's stored sums are divided by its scale factor (0: no statistics, as Caffe) and
  exported as BatchNormalization with Caffe's eps; a Scale layer right after it is folded in.
- In-place layers write new ONNX values; Split and Dropout (identity at test) add no node.
- ArgMax with top_k 1 takes the last of equal maxima (select_last_index), as Caffe does.

Every net output keeps its Caffe blob name; inputs are the Input layers' tops. A layer with no
ONNX equivalent stops the export with a one-line ExportError naming it.
"""

import os
import time

import numpy

from brewnet.netdef import caffe_pb2
from brewnet.netdef.errors import DefinitionError

OPSET = 17
# IR version 8 is what opset 17 shipped with (ONNX 1.12): readable by every runtime that has opset 17
IR_VERSION = 8
# ONNX's protobuf limit is 2 GiB; above this the weights go to a side file (external data)
EXTERNAL_DATA_BYTES = 1800 * 1024 * 1024

MISSING_ONNX = "ONNX export needs the onnx package: pip install 'brewnet[onnx]'"
MISSING_ORT = "checking an ONNX export needs onnxruntime: pip install onnxruntime"

DATA_LAYERS = {"Data", "ImageData", "HDF5Data", "MemoryData", "WindowData", "DummyData", "HDF5Output",
               "Python"}


class ExportError(DefinitionError):
    """A net (or one of its layers) that has no ONNX equivalent; the message is one line."""


class MissingPackageError(ImportError):
    """onnx (or onnxruntime, for the check) is not installed; the message says which extra."""


def _import_onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        raise MissingPackageError(MISSING_ONNX) from None
    return onnx, helper, numpy_helper


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise MissingPackageError(MISSING_ORT) from None
    return onnxruntime


def require(check=False):
    """Raise MissingPackageError unless onnx (and, with ``check``, onnxruntime) can be imported."""
    _import_onnx()
    if check:
        _import_ort()


def _core_net(net):
    """The layers.net.Net behind a pycaffe-style brewnet.Net (or the core net itself)."""
    return net.net if hasattr(net, "net") and not hasattr(net, "top_ids") else net


def _to_numpy(array):
    if isinstance(array, numpy.ndarray):
        return array
    getter = getattr(array, "get", None)  # cupy
    return getter() if getter is not None else numpy.asarray(array)


def _axis(axis, ndim):
    return axis + ndim if axis < 0 else axis


def _spatial(cp, field, n, default):
    """convolution_param's per-axis values (repeated field or its _h/_w pair)."""
    name = "kernel_size" if field == "kernel" else field
    if cp.HasField(field + "_h") or cp.HasField(field + "_w"):
        return [getattr(cp, field + "_h"), getattr(cp, field + "_w")]
    values = list(getattr(cp, name))
    if not values:
        return [default] * n
    return values * n if len(values) == 1 else values


def _pool_geometry(pp):
    if pp.HasField("kernel_h"):
        kernel = [pp.kernel_h, pp.kernel_w]
    else:
        kernel = [pp.kernel_size] * 2
    pad = [pp.pad_h, pp.pad_w] if pp.HasField("pad_h") else [pp.pad] * 2
    stride = [pp.stride_h, pp.stride_w] if pp.HasField("stride_h") else [pp.stride] * 2
    return kernel, stride, pad


class _Exporter:
    """One pass over a core Net's layers, emitting ONNX nodes and initializers."""

    def __init__(self, net, dynamic_batch=False):
        self.onnx, self.helper, self.numpy_helper = _import_onnx()
        self.net = net
        self.dynamic = dynamic_batch
        self.nodes, self.initializers, self.inputs = [], [], []
        self.used = set()  # value names (inputs, outputs of nodes, initializers)
        # the net's inputs and outputs keep their blob names: no auxiliary value may take them
        self.reserved = set(net.inputs) | set(net.outputs)
        self.node_names = set()
        self.value = {}  # blob id -> name of the ONNX value holding its current contents
        self.blob_consts = {}  # id(Blob) -> initializer name (shared parameters export once)
        self.folded = set()  # layer indices already emitted as part of an earlier layer
        # the last layer writing each blob id: its write gets the plain blob name
        self.last_writer = {}
        for i, tops in enumerate(net.top_ids):
            for t in tops:
                self.last_writer[t] = i

    # -- names, constants, nodes -------------------------------------------------------------
    @staticmethod
    def _unique(base, taken):
        name, k = base, 1
        while name in taken:
            name = f"{base}_{k}"
            k += 1
        taken.add(name)
        return name

    def fresh(self, base, blob=False):
        """A value name not used yet: ``base``, else ``base_1``, ``base_2``... Only a blob's own
        value (``blob``) may take a name of the net's inputs and outputs."""
        if not blob and base in self.reserved:
            base += "_"
        return self._unique(base, self.used)

    def const(self, array, hint, dtype=numpy.float32):
        """An initializer holding ``array`` (written into the graph by finish: no copy until then)."""
        name = self.fresh(hint)
        # ONNX stores raw data little-endian
        self.initializers.append((name, numpy.ascontiguousarray(array, dtype=numpy.dtype(dtype).newbyteorder("<"))))
        return name

    def scalar(self, value, hint):
        return self.const(numpy.float32(value), hint)

    def ints(self, values, hint):
        return self.const(numpy.asarray(values, dtype=numpy.int64), hint, dtype=numpy.int64)

    def param(self, layer, index, hint, transform=None):
        """A parameter blob of ``layer`` as an initializer (once per shared blob when untransformed)."""
        blob = layer.blobs[index]
        if transform is None and id(blob) in self.blob_consts:
            return self.blob_consts[id(blob)]
        array = numpy.asarray(_to_numpy(blob.data), dtype=numpy.float32)
        name = self.const(array if transform is None else transform(array), hint)
        if transform is None:
            self.blob_consts[id(blob)] = name
        return name

    def node(self, op, inputs, hint, n_out=1, outputs=None, **attrs):
        outputs = outputs or [self.fresh(f"{hint}:{k}" if n_out > 1 else hint) for k in range(n_out)]
        name = self._unique(hint, self.node_names)
        self.nodes.append(self.helper.make_node(op, list(inputs), list(outputs), name=name, **attrs))
        return outputs if n_out > 1 else outputs[0]

    # -- the walk over the net --------------------------------------------------------------------
    def error(self, i, message):
        return ExportError(f"layer '{self.net.layer_names[i]}' ({self.net.layers[i].type}): {message}",
                           path=self.net.source)

    def top_name(self, i, j):
        """The ONNX name for top j of layer i: the blob's own name for its last write."""
        t = self.net.top_ids[i][j]
        blob = self.net.blob_names[t]
        if blob is None:
            return self.fresh(f"{self.net.layer_names[i]}:top{j}")
        if self.last_writer.get(t) == i:
            return self.fresh(blob, blob=True)
        return self.fresh(f"{blob}@{self.net.layer_names[i]}")

    def bottom_shape(self, i, j=0):
        return tuple(self.net.bottom_vecs[i][j].shape)

    def top_shape(self, i, j=0):
        return tuple(self.net.top_vecs[i][j].shape)

    def batch_dim(self, size):
        """A leading dimension for a Reshape target: 0 (copy the input's) when the batch is dynamic."""
        return 0 if self.dynamic else size

    def run(self):
        for i, layer in enumerate(self.net.layers):
            if i in self.folded:
                continue
            handler = HANDLERS.get(layer.type)
            if handler is None:
                raise self.error(i, unsupported_reason(layer.type))
            bottoms = [self.value[b] for b in self.net.bottom_ids[i]]
            outs = handler(self, i, layer, bottoms)
            if outs is None:
                continue
            for t, name in zip(self.net.top_ids[i], outs):
                self.value[t] = name
        return self.finish()

    def emit(self, i, op, inputs, j=0, **attrs):
        """One node computing top j of layer i."""
        return self.node(op, inputs, self.net.layer_names[i], outputs=[self.top_name(i, j)], **attrs)

    def drop_identities(self, outputs):
        """Remove each Identity whose input is another node's output that nothing else reads: that
        node writes the Identity's output name instead (handlers end in Identity to name a top)."""
        readers = {}
        for node in self.nodes:
            for name in node.input:
                readers[name] = readers.get(name, 0) + 1
        producer = {name: node for node in self.nodes for name in node.output}
        kept = []
        for node in self.nodes:
            source = node.input[0] if node.op_type == "Identity" else None
            if source in producer and readers[source] == 1 and source not in outputs:
                out = producer[source].output
                out[list(out).index(source)] = node.output[0]
                producer[node.output[0]] = producer.pop(source)
                continue
            kept.append(node)
        self.nodes = kept

    def finish(self):
        helper, TP = self.helper, self.onnx.TensorProto
        outputs = []
        for name in self.net.outputs:
            blob_id = self.net.blob_names.index(name)
            current = self.value[blob_id]
            if current != name and name not in self.used:
                current = self.node("Identity", [current], name, outputs=[self.fresh(name, blob=True)])
            outputs.append(current)
        self.drop_identities(set(outputs) | {i.name for i in self.inputs})
        infos = []
        for name, current in zip(self.net.outputs, outputs):
            shape = list(self.net.blobs[name].shape)
            if self.dynamic and shape:
                shape[0] = "N"
            infos.append(helper.make_tensor_value_info(current, TP.FLOAT, shape))
        graph = helper.make_graph(self.nodes, self.net.name or "brewnet", self.inputs, infos)
        for name, array in self.initializers:
            # straight into the graph: make_graph(initializer=...) would copy every weight once more
            tensor = graph.initializer.add()
            tensor.name = name
            tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
            tensor.dims.extend(array.shape)
            tensor.raw_data = array.tobytes()
        try:
            from importlib.metadata import version

            producer_version = version("brewnet")
        except Exception:  # a source checkout that was never installed
            producer_version = "0"
        model = helper.make_model(graph, producer_name="brewnet", producer_version=producer_version,
                                  opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        if self.net.source:
            model.doc_string = f"exported by brewnet from {os.path.basename(self.net.source)}"
        return model


# -- handlers: (exporter, layer index, layer, bottom value names) -> top value names ----------------
def _input(ex, i, layer, bottoms):
    TP = ex.onnx.TensorProto
    names = []
    for j, t in enumerate(ex.net.top_ids[i]):
        name = ex.fresh(ex.net.blob_names[t], blob=True)
        shape = list(ex.top_shape(i, j))
        if ex.dynamic and shape:
            shape[0] = "N"
        ex.inputs.append(ex.helper.make_tensor_value_info(name, TP.FLOAT, shape))
        names.append(name)
    return names


def _parameter(ex, i, layer, bottoms):
    return [ex.param(layer, 0, ex.top_name(i, 0))]


def _alias(ex, i, layer, bottoms):
    """Split, Dropout at test, one-bottom Concat / one-top Slice: the tops are the bottom."""
    return [bottoms[0]] * len(ex.net.top_ids[i])


def _silence(ex, i, layer, bottoms):
    return None


def _dropout(ex, i, layer, bottoms):
    if layer.phase == caffe_pb2.TRAIN:
        raise ex.error(i, "random dropout (TRAIN phase) has no deterministic ONNX equivalent; export "
                          "the TEST phase")
    return _alias(ex, i, layer, bottoms)


def _conv(ex, i, layer, bottoms):
    cp = layer.param.convolution_param
    shape = ex.bottom_shape(i)
    if _axis(cp.axis, len(shape)) != 1:
        raise ex.error(i, f"channels on axis {cp.axis}: ONNX convolutions need them on axis 1")
    n = len(shape) - 2
    kernel, stride = _spatial(cp, "kernel", n, None), _spatial(cp, "stride", n, 1)
    pad = _spatial(cp, "pad", n, 0)
    dil = list(cp.dilation)
    dilation = (dil * n if len(dil) == 1 else dil) if dil else [1] * n
    name = ex.net.layer_names[i]
    inputs = [ex.param(layer, 0, f"{name}/weight")]
    if cp.bias_term:
        inputs.append(ex.param(layer, 1, f"{name}/bias"))
    op = "ConvTranspose" if layer.type == "Deconvolution" else "Conv"
    return [ex.emit(i, op, [x] + inputs, j, kernel_shape=kernel, strides=stride, pads=pad + pad,
                    dilations=dilation, group=cp.group) for j, x in enumerate(bottoms)]


def _pool_pads(in_hw, out_hw, kernel, stride, pad):
    """Extra end pad per axis so that ONNX's floor formula gives Caffe's output size."""
    return [max(0, (o - 1) * s + k - (n + 2 * p)) for n, o, k, s, p in zip(in_hw, out_hw, kernel, stride, pad)]


def _pooling(ex, i, layer, bottoms):
    pp = layer.param.pooling_param
    P = caffe_pb2.PoolingParameter
    if len(ex.net.top_ids[i]) > 1:
        raise ex.error(i, "the argmax mask top has no ONNX equivalent (Caffe's mask indexes each plane)")
    if pp.pool not in (P.MAX, P.AVE):
        raise ex.error(i, "STOCHASTIC pooling has no ONNX equivalent (only MAX and AVE)")
    x = bottoms[0]
    in_hw, out_hw = ex.bottom_shape(i)[2:], ex.top_shape(i)[2:]
    if pp.global_pooling:
        return [ex.emit(i, "GlobalMaxPool" if pp.pool == P.MAX else "GlobalAveragePool", [x])]
    kernel, stride, pad = _pool_geometry(pp)
    extra = _pool_pads(in_hw, out_hw, kernel, stride, pad)
    name = ex.net.layer_names[i]
    if pp.pool == P.AVE and any(e >= k for e, k in zip(extra, kernel)):
        # only without pad can Caffe's last window start past the image; its average is then 0 / 0
        raise ex.error(i, "a window lies wholly outside the image (stride larger than the kernel), where "
                          "Caffe's average divides by zero; ONNX has no such window")
    common = dict(kernel_shape=kernel, strides=stride)
    if pp.pool == P.MAX:
        ends = [p + e for p, e in zip(pad, extra)]
        if all(p < k for p, k in zip(ends, kernel)):
            return [ex.emit(i, "MaxPool", [x], pads=pad + ends, **common)]
        # runtimes want pads below the kernel: pad explicitly with the lowest float (never a maximum)
        lowest = ex.scalar(numpy.finfo(numpy.float32).min, f"{name}/lowest")
        padded = ex.node("Pad", [x, ex.ints([0, 0] + pad + [0, 0] + ends, f"{name}/pads"), lowest],
                         f"{name}/pad")
        return [ex.emit(i, "MaxPool", [padded], pads=[0] * 4, **common)]
    if not any(extra):
        # every window lies inside image + pad: Caffe's divisor is the whole kernel
        return [ex.emit(i, "AveragePool", [x], pads=pad + pad, count_include_pad=1, **common)]
    # the last windows reach past image + pad: Caffe counts the pad but not what lies beyond it
    if any(pad):
        x = ex.node("Pad", [x, ex.ints([0, 0] + pad + [0, 0] + pad, f"{name}/pads")], f"{name}/pad")
    return [ex.emit(i, "AveragePool", [x], pads=[0, 0] + extra, count_include_pad=0, **common)]


def _lrn(ex, i, layer, bottoms):
    lp = layer.param.lrn_param
    x, name = bottoms[0], ex.net.layer_names[i]
    if lp.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS:
        return [ex.emit(i, "LRN", [x], size=lp.local_size, alpha=lp.alpha, beta=lp.beta, bias=lp.k)]
    # WITHIN_CHANNEL: x * (1 + alpha * avg(x^2 over size x size, zeros outside))^-beta
    size, half = lp.local_size, (lp.local_size - 1) // 2
    square = ex.node("Mul", [x, x], f"{name}/square")
    avg = ex.node("AveragePool", [square], f"{name}/window", kernel_shape=[size, size],
                  pads=[half] * 4, count_include_pad=1)
    scaled = ex.node("Mul", [avg, ex.scalar(lp.alpha, f"{name}/alpha")], f"{name}/scaled")
    base = ex.node("Add", [scaled, ex.scalar(1.0, f"{name}/one")], f"{name}/base")
    power = ex.node("Pow", [base, ex.scalar(-lp.beta, f"{name}/minus_beta")], f"{name}/power")
    return [ex.emit(i, "Mul", [x, power])]


def _relu(ex, i, layer, bottoms):
    slope = layer.param.relu_param.negative_slope
    if slope:
        return [ex.emit(i, "LeakyRelu", bottoms, alpha=slope)]
    return [ex.emit(i, "Relu", bottoms)]


def _prelu(ex, i, layer, bottoms):
    ndim = len(ex.bottom_shape(i))
    shared = layer.param.prelu_param.channel_shared
    shape = (1,) if shared else (-1,) + (1,) * (ndim - 2)
    slope = ex.param(layer, 0, f"{ex.net.layer_names[i]}/slope", transform=lambda a: a.reshape(shape))
    return [ex.emit(i, "PRelu", [bottoms[0], slope])]


def _simple(op, **attrs_of_param):
    def handler(ex, i, layer, bottoms):
        attrs = {k: f(layer.param) for k, f in attrs_of_param.items()}
        return [ex.emit(i, op, bottoms, **attrs)]
    return handler


def _affine(ex, x, scale, shift, hint):
    """scale * x + shift, leaving out the identity parts."""
    if scale != 1:
        x = ex.node("Mul", [x, ex.scalar(scale, f"{hint}/scale")], f"{hint}/scaled")
    if shift != 0:
        x = ex.node("Add", [x, ex.scalar(shift, f"{hint}/shift")], f"{hint}/shifted")
    return x


def _finish(ex, i, value):
    """Name ``value`` as top 0 of layer i (an Identity when the last node was an auxiliary one)."""
    return [ex.emit(i, "Identity", [value])]


def _power(ex, i, layer, bottoms):
    p = layer.param.power_param
    name, x = ex.net.layer_names[i], bottoms[0]
    if p.power * p.scale == 0:
        value = 1.0 if p.power == 0 else float(numpy.float32(p.shift) ** numpy.float32(p.power))
        shape = ex.node("Shape", [x], f"{name}/shape")
        fill = ex.helper.make_tensor("value", ex.onnx.TensorProto.FLOAT, [1], [value])
        return [ex.emit(i, "ConstantOfShape", [shape], value=fill)]
    y = _affine(ex, x, p.scale, p.shift, name)
    if p.power != 1:
        return [ex.emit(i, "Pow", [y, ex.scalar(p.power, f"{name}/power")])]
    return _finish(ex, i, y)


def _log_base(base):
    return 1.0 if base == -1 else float(numpy.log(numpy.float32(base)))


def _exp(ex, i, layer, bottoms):
    p = layer.param.exp_param
    name = ex.net.layer_names[i]
    inner = _log_base(p.base) * p.scale
    outer = 1.0 if p.shift == 0 else (numpy.exp(p.shift) if p.base == -1 else numpy.float64(p.base) ** p.shift)
    y = ex.node("Exp", [_affine(ex, bottoms[0], inner, 0, name)], f"{name}/exp")
    if outer != 1:
        return [ex.emit(i, "Mul", [y, ex.scalar(outer, f"{name}/outer")])]
    return _finish(ex, i, y)


def _log(ex, i, layer, bottoms):
    p = layer.param.log_param
    name = ex.net.layer_names[i]
    y = ex.node("Log", [_affine(ex, bottoms[0], p.scale, p.shift, name)], f"{name}/log")
    factor = 1.0 / _log_base(p.base)
    if factor != 1:
        return [ex.emit(i, "Mul", [y, ex.scalar(factor, f"{name}/base")])]
    return _finish(ex, i, y)


def _threshold(ex, i, layer, bottoms):
    name = ex.net.layer_names[i]
    above = ex.node("Greater", [bottoms[0], ex.scalar(layer.param.threshold_param.threshold,
                                                       f"{name}/threshold")], f"{name}/above")
    return [ex.emit(i, "Cast", [above], to=ex.onnx.TensorProto.FLOAT)]


def _clip(ex, i, layer, bottoms):
    p, name = layer.param.clip_param, ex.net.layer_names[i]
    return [ex.emit(i, "Clip", [bottoms[0], ex.scalar(p.min, f"{name}/min"), ex.scalar(p.max, f"{name}/max")])]


def _swish(ex, i, layer, bottoms):
    name, x = ex.net.layer_names[i], bottoms[0]
    gate = ex.node("Sigmoid", [_affine(ex, x, layer.param.swish_param.beta, 0, name)], f"{name}/gate")
    return [ex.emit(i, "Mul", [x, gate])]


def _inner_product(ex, i, layer, bottoms):
    p = layer.param.inner_product_param
    shape = ex.bottom_shape(i)
    axis = _axis(p.axis, len(shape))
    name, x = ex.net.layer_names[i], bottoms[0]
    if not (len(shape) == 2 and axis == 1):
        x = ex.node("Flatten", [x], f"{name}/flatten", axis=axis)
    inputs = [x, ex.param(layer, 0, f"{name}/weight")]
    if p.bias_term:
        inputs.append(ex.param(layer, 1, f"{name}/bias"))
    # weights are (N, K), or (K, N) with transpose: true
    trans_b = 0 if p.transpose else 1
    if axis == 1:
        return [ex.emit(i, "Gemm", inputs, transB=trans_b)]
    y = ex.node("Gemm", inputs, f"{name}/gemm", transB=trans_b)
    out = list(ex.top_shape(i))
    if out and axis > 0:
        out[0] = -1 if ex.dynamic else out[0]
    return [ex.emit(i, "Reshape", [y, ex.ints(out, f"{name}/shape")])]


def _softmax(ex, i, layer, bottoms):
    axis = _axis(layer.param.softmax_param.axis, len(ex.bottom_shape(i)))
    return [ex.emit(i, "Softmax", bottoms, axis=axis)]


def _concat(ex, i, layer, bottoms):
    if len(bottoms) == 1:
        return _alias(ex, i, layer, bottoms)
    p = layer.param.concat_param
    axis = p.concat_dim if p.HasField("concat_dim") else _axis(p.axis, len(ex.bottom_shape(i)))
    return [ex.emit(i, "Concat", bottoms, axis=axis)]


def _slice(ex, i, layer, bottoms):
    tops = ex.net.top_ids[i]
    if len(tops) == 1:
        return _alias(ex, i, layer, bottoms)
    p = layer.param.slice_param
    axis = p.slice_dim if p.HasField("slice_dim") else _axis(p.axis, len(ex.bottom_shape(i)))
    if axis == 0 and ex.dynamic:
        raise ex.error(i, "slices the batch axis, which a dynamic batch cannot keep")
    sizes = [ex.top_shape(i, j)[axis] for j in range(len(tops))]
    outputs = [ex.top_name(i, j) for j in range(len(tops))]
    name = ex.net.layer_names[i]
    ex.node("Split", [bottoms[0], ex.ints(sizes, f"{name}/sizes")], name, n_out=len(tops), outputs=outputs,
            axis=axis)
    return outputs


def _kept_tail(out, first, aligned):
    """The Reshape target's axes after the rewritten ones: 0s (copy the input's) where they keep
    their index, else the sizes the net computed."""
    tail = list(out[first:])
    return [0] * len(tail) if aligned else tail


def _flatten(ex, i, layer, bottoms):
    p = layer.param.flatten_param
    shape = ex.bottom_shape(i)
    start, end = _axis(p.axis, len(shape)), _axis(p.end_axis, len(shape))
    if start == 1 and end == len(shape) - 1:
        return [ex.emit(i, "Flatten", bottoms, axis=1)]
    target = [0] * start + [-1] + _kept_tail(ex.top_shape(i), start + 1, aligned=end == start)
    return [ex.emit(i, "Reshape", [bottoms[0], ex.ints(target, f"{ex.net.layer_names[i]}/shape")])]


def _reshape(ex, i, layer, bottoms):
    """Caffe's shape dims replace axes [axis, axis + num_axes). Its 0 copies the input axis at
    axis + index, and ONNX's 0 the input axis at the same output index: the same axis, since the
    axes before ``axis`` are kept (as 0s). -1 means the same in both."""
    p = layer.param.reshape_param
    n = len(ex.bottom_shape(i))
    start = p.axis if p.axis >= 0 else n + p.axis + 1
    end = n if p.num_axes == -1 else start + p.num_axes
    dims = [int(d) for d in p.shape.dim]
    target = [0] * start + dims + _kept_tail(ex.top_shape(i), start + len(dims),
                                             aligned=end - start == len(dims))
    return [ex.emit(i, "Reshape", [bottoms[0], ex.ints(target, f"{ex.net.layer_names[i]}/shape")])]


def _crop(ex, i, layer, bottoms):
    cp = layer.param.crop_param
    src, out = ex.bottom_shape(i, 0), ex.top_shape(i)
    axis = _axis(cp.axis, len(src))
    offsets = list(cp.offset)
    starts, ends, axes = [], [], []
    for k in range(axis, len(src)):
        off = offsets[0] if len(offsets) == 1 else (offsets[k - axis] if offsets else 0)
        if off == 0 and out[k] == src[k]:
            continue
        if k == 0 and ex.dynamic:
            raise ex.error(i, "crops the batch axis, which a dynamic batch cannot keep")
        starts.append(off)
        ends.append(off + out[k])
        axes.append(k)
    if not axes:
        return _finish(ex, i, bottoms[0])
    name = ex.net.layer_names[i]
    return [ex.emit(i, "Slice", [bottoms[0], ex.ints(starts, f"{name}/starts"), ex.ints(ends, f"{name}/ends"),
                                 ex.ints(axes, f"{name}/axes")])]


def _eltwise(ex, i, layer, bottoms):
    p = layer.param.eltwise_param
    E = caffe_pb2.EltwiseParameter
    name = ex.net.layer_names[i]
    if p.operation == E.PROD:
        y = bottoms[0]
        for k, b in enumerate(bottoms[1:], 1):
            if k == len(bottoms) - 1:
                return [ex.emit(i, "Mul", [y, b])]
            y = ex.node("Mul", [y, b], f"{name}/prod{k}")
    if p.operation == E.MAX:
        return [ex.emit(i, "Max", bottoms)]
    coeffs = list(p.coeff) or [1.0] * len(bottoms)
    terms = [b if c == 1 else ex.node("Mul", [b, ex.scalar(c, f"{name}/coeff{k}")], f"{name}/term{k}")
             for k, (b, c) in enumerate(zip(bottoms, coeffs))]
    if len(terms) == 2:
        return [ex.emit(i, "Add", terms)]
    return [ex.emit(i, "Sum", terms)]


def _bn_stats(layer):
    factor = float(_to_numpy(layer.blobs[2].data).reshape(-1)[0])
    scale = 0.0 if factor == 0 else 1.0 / factor
    mean = _to_numpy(layer.blobs[0].data).astype(numpy.float64) * scale
    var = _to_numpy(layer.blobs[1].data).astype(numpy.float64) * scale
    return mean, var


def _foldable_scale(ex, i):
    """The Scale layer right after BatchNorm i that can fold into it: one bottom (BatchNorm's top),
    its own (C,) scale on axis 1; else None."""
    j = i + 1
    if j >= len(ex.net.layers) or ex.net.layers[j].type != "Scale":
        return None
    scale = ex.net.layers[j]
    if len(ex.net.bottom_ids[j]) != 1 or ex.net.bottom_ids[j][0] != ex.net.top_ids[i][0]:
        return None
    shape = ex.bottom_shape(i)
    sp = scale.param.scale_param
    if len(shape) < 2 or _axis(sp.axis, len(shape)) != 1 or tuple(scale.blobs[0].shape) != (shape[1],):
        return None
    return j


def _batch_norm(ex, i, layer, bottoms):
    p = layer.param.batch_norm_param
    shape = ex.bottom_shape(i)
    name, x = ex.net.layer_names[i], bottoms[0]
    use_global = p.use_global_stats if p.HasField("use_global_stats") else layer.phase == caffe_pb2.TEST
    if len(shape) < 2:
        raise ex.error(i, f"input of shape {shape}: ONNX BatchNormalization needs (N, C, ...)")
    if not use_global:
        # statistics of the batch itself (use_global_stats: false): mean and variance over N and space
        axes = [0] + list(range(2, len(shape)))
        mean = ex.node("ReduceMean", [x], f"{name}/mean", axes=axes, keepdims=1)
        centered = ex.node("Sub", [x, mean], f"{name}/centered")
        var = ex.node("ReduceMean", [ex.node("Mul", [centered, centered], f"{name}/square")], f"{name}/var",
                      axes=axes, keepdims=1)
        std = ex.node("Sqrt", [ex.node("Add", [var, ex.scalar(p.eps, f"{name}/eps")], f"{name}/var_eps")],
                      f"{name}/std")
        return [ex.emit(i, "Div", [centered, std])]
    mean, var = _bn_stats(layer)
    channels = shape[1]
    j = _foldable_scale(ex, i)
    if j is None:
        gamma = ex.const(numpy.ones(channels), f"{name}/gamma")
        beta = ex.const(numpy.zeros(channels), f"{name}/beta")
    else:
        scale = ex.net.layers[j]
        sname = ex.net.layer_names[j]
        gamma = ex.param(scale, 0, f"{sname}/scale")
        if scale.param.scale_param.bias_term:
            beta = ex.param(scale, 1, f"{sname}/bias")
        else:
            beta = ex.const(numpy.zeros(channels), f"{sname}/bias")
        ex.folded.add(j)
    inputs = [x, gamma, beta, ex.const(mean, f"{name}/mean"), ex.const(var, f"{name}/var")]
    if j is None:
        return [ex.emit(i, "BatchNormalization", inputs, epsilon=p.eps)]
    out = ex.node("BatchNormalization", inputs, f"{name}+{ex.net.layer_names[j]}",
                  outputs=[ex.top_name(j, 0)], epsilon=p.eps)
    ex.value[ex.net.top_ids[i][0]] = out  # BatchNorm's own top is never read (the Scale was its only reader)
    ex.value[ex.net.top_ids[j][0]] = out
    return None


def _broadcast_operand(ex, i, value, operand_ndim, axis, ndim, hint):
    """An operand spanning axes [axis, axis + operand_ndim) of an ndim-axis input, made
    broadcastable (trailing axes of size 1)."""
    trailing = ndim - axis - operand_ndim if operand_ndim else 0
    if trailing <= 0:
        return value
    axes = list(range(operand_ndim, operand_ndim + trailing))
    return ex.node("Unsqueeze", [value, ex.ints(axes, f"{hint}/axes")], f"{hint}/unsqueeze")


def _scale_or_bias(ex, i, layer, bottoms):
    is_scale = layer.type == "Scale"
    p = layer.param.scale_param if is_scale else layer.param.bias_param
    shape = ex.bottom_shape(i)
    name = ex.net.layer_names[i]
    ndim = len(shape)
    if len(bottoms) > 1:
        operand_shape = ex.bottom_shape(i, 1)
        operand = bottoms[1]
    else:
        operand_shape = tuple(layer.blobs[0].shape)
        operand = None
    axis = 0 if not operand_shape else _axis(p.axis, ndim)
    trailing = ndim - axis - len(operand_shape) if operand_shape else 0

    def as_const(index, hint):
        full = tuple(layer.blobs[index].shape) + (1,) * trailing
        return ex.param(layer, index, hint, transform=(lambda a: a.reshape(full)) if trailing else None)

    if operand is None:
        operand = as_const(0, f"{name}/{'scale' if is_scale else 'bias'}")
    else:
        operand = _broadcast_operand(ex, i, operand, len(operand_shape), axis, ndim, name)
    if not is_scale:
        return [ex.emit(i, "Add", [bottoms[0], operand])]
    if not p.bias_term:
        return [ex.emit(i, "Mul", [bottoms[0], operand])]
    y = ex.node("Mul", [bottoms[0], operand], f"{name}/scaled")
    bias = as_const(len(layer.blobs) - 1, f"{name}/bias")
    return [ex.emit(i, "Add", [y, bias])]


def _mvn(ex, i, layer, bottoms):
    p = layer.param.mvn_param
    shape = ex.bottom_shape(i)
    name, x = ex.net.layer_names[i], bottoms[0]
    first = 1 if p.across_channels or len(shape) < 2 else 2
    axes = list(range(first, len(shape)))
    mean = ex.node("ReduceMean", [x], f"{name}/mean", axes=axes, keepdims=1)
    if not p.normalize_variance:
        return [ex.emit(i, "Sub", [x, mean])]
    centered = ex.node("Sub", [x, mean], f"{name}/centered")
    var = ex.node("ReduceMean", [ex.node("Mul", [centered, centered], f"{name}/square")], f"{name}/var",
                  axes=axes, keepdims=1)
    # Caffe adds eps to the standard deviation
    std = ex.node("Add", [ex.node("Sqrt", [var], f"{name}/sqrt"), ex.scalar(p.eps, f"{name}/eps")],
                  f"{name}/std")
    return [ex.emit(i, "Div", [centered, std])]


def _argmax(ex, i, layer, bottoms):
    p = layer.param.argmax_param
    shape = ex.bottom_shape(i)
    name, x = ex.net.layer_names[i], bottoms[0]
    k = int(p.top_k)
    FLOAT = ex.onnx.TensorProto.FLOAT

    def ranked(value, axis, final):
        """(indices as float, values or None) of the top k along axis; ``final``: name the result as the top."""
        if k == 1 and not p.out_max_val:
            idx = ex.node("ArgMax", [value], f"{name}/argmax", axis=axis, keepdims=1, select_last_index=1)
            cast = ex.emit(i, "Cast", [idx], to=FLOAT) if final else ex.node("Cast", [idx], f"{name}/index",
                                                                                to=FLOAT)
            return cast, None
        vals, idx = ex.node("TopK", [value, ex.ints([k], f"{name}/k")], f"{name}/topk", n_out=2, axis=axis,
                            largest=1, sorted=1)
        return idx, vals

    if p.HasField("axis"):
        axis = _axis(p.axis, len(shape))
        idx, vals = ranked(x, axis, final=True)
        if vals is None:
            return [idx]
        if p.out_max_val:
            return _finish(ex, i, vals)
        return [ex.emit(i, "Cast", [idx], to=FLOAT)]
    flat = ex.node("Flatten", [x], f"{name}/flatten", axis=1)
    idx, vals = ranked(flat, 1, final=False)
    if vals is not None:
        idx = ex.node("Cast", [idx], f"{name}/index", to=FLOAT)
    y = idx if not p.out_max_val else ex.node("Concat", [idx, vals], f"{name}/concat", axis=1)
    out = list(ex.top_shape(i))
    out[0] = ex.batch_dim(out[0])
    return [ex.emit(i, "Reshape", [y, ex.ints(out, f"{name}/shape")])]


def _reduction(ex, i, layer, bottoms):
    p = layer.param.reduction_param
    R = caffe_pb2.ReductionParameter
    shape = ex.bottom_shape(i)
    name, x = ex.net.layer_names[i], bottoms[0]
    axes = list(range(_axis(p.axis, len(shape)), len(shape)))
    if p.operation == R.SUM:
        y = ex.node("ReduceSum", [x, ex.ints(axes, f"{name}/axes")], f"{name}/reduce", keepdims=0)
    else:
        op = {R.ASUM: "ReduceL1", R.SUMSQ: "ReduceSumSquare", R.MEAN: "ReduceMean"}[p.operation]
        y = ex.node(op, [x], f"{name}/reduce", axes=axes, keepdims=0)
    if p.coeff != 1:
        return [ex.emit(i, "Mul", [y, ex.scalar(p.coeff, f"{name}/coeff")])]
    return _finish(ex, i, y)


def _tile(ex, i, layer, bottoms):
    p = layer.param.tile_param
    shape = ex.bottom_shape(i)
    repeats = [1] * len(shape)
    repeats[_axis(p.axis, len(shape))] = int(p.tiles)
    return [ex.emit(i, "Tile", [bottoms[0], ex.ints(repeats, f"{ex.net.layer_names[i]}/repeats")])]


def _embed(ex, i, layer, bottoms):
    p = layer.param.embed_param
    name = ex.net.layer_names[i]
    index = ex.node("Cast", [bottoms[0]], f"{name}/index", to=ex.onnx.TensorProto.INT64)
    weight = ex.param(layer, 0, f"{name}/weight")
    if not p.bias_term:
        return [ex.emit(i, "Gather", [weight, index], axis=0)]
    rows = ex.node("Gather", [weight, index], f"{name}/gather", axis=0)
    return [ex.emit(i, "Add", [rows, ex.param(layer, 1, f"{name}/bias")])]


HANDLERS = {
    "Input": _input,
    "Parameter": _parameter,
    "Split": _alias,
    "Dropout": _dropout,
    "Silence": _silence,
    "Convolution": _conv,
    "Deconvolution": _conv,
    "Pooling": _pooling,
    "LRN": _lrn,
    "ReLU": _relu,
    "PReLU": _prelu,
    "ELU": _simple("Elu", alpha=lambda lp: lp.elu_param.alpha),
    "Sigmoid": _simple("Sigmoid"),
    "TanH": _simple("Tanh"),
    "AbsVal": _simple("Abs"),
    "BNLL": _simple("Softplus"),
    "Power": _power,
    "Exp": _exp,
    "Log": _log,
    "Threshold": _threshold,
    "Clip": _clip,
    "Swish": _swish,
    "InnerProduct": _inner_product,
    "Embed": _embed,
    "Softmax": _softmax,
    "Concat": _concat,
    "Slice": _slice,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Crop": _crop,
    "Eltwise": _eltwise,
    "BatchNorm": _batch_norm,
    "Scale": _scale_or_bias,
    "Bias": _scale_or_bias,
    "MVN": _mvn,
    "ArgMax": _argmax,
    "Reduction": _reduction,
    "Tile": _tile,
}

SUPPORTED = sorted(HANDLERS)


def unsupported_reason(type_name):
    """Why a layer type cannot be exported, in a few words (for the one-line error)."""
    if type_name in DATA_LAYERS:
        return ("a data layer has no ONNX equivalent: export the deploy net, whose inputs are Input layers "
                "(or input: fields)")
    if type_name.endswith("Loss") or type_name in ("Accuracy", "InfogainLoss"):
        return "a loss or accuracy layer has no ONNX equivalent: export the deploy net, without losses"
    return "no ONNX equivalent in brewnet's exporter (it exports " + ", ".join(SUPPORTED) + ")"


def check_exportable(net_param, source=None):
    """Raise ExportError for the first layer of an (already phase-filtered) NetParameter that has no
    ONNX equivalent, before any weights are allocated."""
    for lp in net_param.layer:
        if lp.type not in HANDLERS:
            raise ExportError(f"layer '{lp.name}' ({lp.type}): {unsupported_reason(lp.type)}", path=source)


def to_onnx(net, dynamic_batch=False):
    """The ONNX ModelProto (opset 17) computing ``net``'s forward pass with its current weights.

    ``net``: a brewnet.Net or a brewnet.layers.net.Net. ``dynamic_batch``: the first axis of inputs
    and outputs is a symbolic ``N`` instead of the prototxt's batch size."""
    return _Exporter(_core_net(net), dynamic_batch=dynamic_batch).run()


def _weight_bytes(model):
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_model(model, path):
    """Write ``model`` to ``path`` atomically. Over EXTERNAL_DATA_BYTES of weights (ONNX's protobuf
    limit is 2 GiB) go to ``path``.data beside it, written first."""
    onnx = _import_onnx()[0]
    from brewnet import netdef

    path = os.fspath(path)
    if _weight_bytes(model) <= EXTERNAL_DATA_BYTES:
        with netdef.atomic_write(path) as handle:
            handle.write(model.SerializeToString())
        return
    import shutil
    import tempfile

    folder, base = os.path.split(os.path.abspath(path))
    location = base + ".data"
    scratch = tempfile.mkdtemp(prefix="." + base + ".", dir=folder)
    try:
        onnx.save_model(model, os.path.join(scratch, base), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=location)
        os.replace(os.path.join(scratch, location), os.path.join(folder, location))
        os.replace(os.path.join(scratch, base), path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def export_onnx(net, path=None, dynamic_batch=False, check=True):
    """Export ``net`` (with its weights) to ONNX; write it to ``path`` when given. Returns the model.

    ``check``: run onnx's checker over the model (over the written file for external weights)."""
    model = to_onnx(net, dynamic_batch=dynamic_batch)
    onnx = _import_onnx()[0]
    large = _weight_bytes(model) > EXTERNAL_DATA_BYTES
    if check and not large:
        onnx.checker.check_model(model)
    if path is not None:
        save_model(model, path)
        if check and large:
            onnx.checker.check_model(os.fspath(path))
    return model


def random_inputs(net, batch=None, seed=0):
    """{input name: float32 array} of standard normal values in the net's input shapes (``batch``
    replaces the first axis)."""
    net = _core_net(net)
    rng = numpy.random.default_rng(seed)
    out = {}
    for name, blob in zip(net.inputs, net.input_blobs):
        shape = list(blob.shape)
        if batch is not None and shape:
            shape[0] = batch
        out[name] = rng.standard_normal(shape).astype(numpy.float32)
    return out


def brewnet_forward(net, inputs, names=None):
    """{name: numpy array} of the blobs ``names`` (default: the outputs) after ``net``'s forward pass
    on ``inputs`` (its inputs are reshaped to fit)."""
    net = _core_net(net)
    changed = False
    for name, blob in zip(net.inputs, net.input_blobs):
        array = inputs[name]
        if tuple(blob.shape) != array.shape:
            blob.reshape(*array.shape)
            changed = True
        blob.data[...] = blob.xp.asarray(array)
    if changed:
        net.reshape()
    net.forward()
    return {name: _to_numpy(net.blobs[name].data).copy() for name in (net.outputs if names is None else names)}


def compare_with_onnxruntime(net, model, inputs=None, seed=0, every_blob=False):
    """Run ``model`` (a ModelProto or a path) in onnxruntime and ``net`` in brewnet on the same inputs
    (random ones unless given): {name: (max |difference|, max |brewnet value|)} for the outputs, and
    with ``every_blob`` for every blob whose final value the graph computes under its own name too
    (a saturated softmax hides nothing then)."""
    ort = _import_ort()
    onnx = _import_onnx()[0]
    core = _core_net(net)
    names = list(core.outputs)
    if every_blob:
        loaded = onnx.load(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else model
        model = onnx.ModelProto()
        model.CopyFrom(loaded)
        computed = {out for node in model.graph.node for out in node.output}
        for name in core.blobs:
            if name in computed and name not in names:
                names.append(name)
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    inputs = inputs if inputs is not None else random_inputs(core, seed=seed)
    got = dict(zip(names, session.run(names, inputs)))
    want = brewnet_forward(core, inputs, names)
    result = {}
    for name in names:
        other, ref = got[name].astype(numpy.float64), want[name].astype(numpy.float64)
        if other.shape != ref.shape:
            raise ValueError(f"blob '{name}': onnxruntime gives shape {other.shape}, brewnet {ref.shape}")
        result[name] = (float(numpy.max(numpy.abs(other - ref))) if ref.size else 0.0,
                        float(numpy.max(numpy.abs(ref))) if ref.size else 0.0)
    return result


def load_net_for_export(model, weights=None, level=None, stages=None):
    """The TEST-phase core Net of a deploy prototxt (or ``zoo:NAME``) with ``weights`` copied in, after
    checking (before any weights are allocated) that every layer it keeps can be exported.
    Returns (net, names of the net's layers with parameters that the weights file lacks)."""
    from brewnet import netdef
    from brewnet.api import resolve_model, resolve_weights
    from brewnet.layers.net import Net

    source = str(resolve_model(model))
    param = netdef.read_net(source)
    state = netdef.make_net_state(phase=caffe_pb2.TEST, level=level, stages=stages, base=param.state)
    check_exportable(netdef.filter_net(param, state), source)
    net = Net(param, phase=caffe_pb2.TEST, level=level, stages=stages, source=source)
    missing = []
    if weights is not None:
        trained = netdef.read_weights(str(resolve_weights(weights)))
        have = {layer.name for layer in trained.layer if len(layer.blobs)}
        net.copy_trained_layers_from(trained)
        missing = [name for name, layer in zip(net.layer_names, net.layers) if layer.blobs and name not in have]
    return net, missing


def timed_export(net, path=None, dynamic_batch=False):
    """export_onnx, and the seconds it took."""
    start = time.perf_counter()
    model = export_onnx(net, path, dynamic_batch=dynamic_batch)
    return model, time.perf_counter() - start
