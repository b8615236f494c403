"""pycaffe's ``caffe.net_spec``: nets written as Python calls.

    from brewnet.pycaffe import layers as L, params as P, NetSpec
    n = NetSpec()
    n.data, n.label = L.DummyData(shape=[dict(dim=[64, 1, 28, 28]), dict(dim=[64, 1])], ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.loss = L.SoftmaxWithLoss(n.pool1, n.label)
    print(n.to_proto())

``L.Type(*bottoms, **fields)`` makes a layer of that type: keywords ending in
``param`` set those LayerParameter fields, others go to the type's own
``<type>_param`` message when it has that field and to the LayerParameter
otherwise (Deconvolution and Im2col use ``convolution_param``, RNN and LSTM
``recurrent_param``, where pycaffe fails); ``ntop`` (default 1) and
``in_place`` are the spec's own. Lists
fill repeated fields, dicts fill messages, and a single value given to a
repeated field is a one-element list. Names: a NetSpec's attribute names;
anything unnamed is ``Type`` + a per-type counter, in the order the net is
walked. The NetParameter text is pycaffe's for the same spec.
"""

import collections

from brewnet.netdef import caffe_pb2

__all__ = ["NetSpec", "Top", "Function", "Layers", "Parameters", "layers", "params", "to_proto",
           "assign_proto", "param_name_dict"]


def param_name_dict():
    """{layer type: its parameter field's prefix}, from the LayerParameter fields named
    ``*_param`` and their message types (``ConvolutionParameter convolution_param``
    gives 'Convolution': 'convolution')."""
    names = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            type_name = field.message_type.name
            if type_name.endswith("Parameter"):
                names[type_name[:-len("Parameter")]] = field.name[:-len("_param")]
    return names


_PARAM_NAMES = param_name_dict()
# types that read another type's parameter message: pycaffe fails on their own keywords
# (L.Deconvolution(x, num_output=8) raises AttributeError there); brewnet fills the message
_PARAM_NAMES_SHARED = {"Deconvolution": "convolution", "Im2col": "convolution", "RNN": "recurrent",
                       "LSTM": "recurrent"}


def _is_repeated(container):
    return hasattr(container, "extend")


def assign_proto(proto, name, val):
    """Set field ``name`` of message ``proto`` from a Python value: a dict fills a message,
    a list fills a repeated field (dicts in it add messages), anything else is assigned.
    A lone value given to a repeated field counts as a one-element list."""
    field = getattr(proto, name)
    if _is_repeated(field) and not isinstance(val, list):
        val = [val]
    if isinstance(val, list):
        if val and isinstance(val[0], dict):
            for item in val:
                message = field.add()
                for key, value in item.items():
                    assign_proto(message, key, value)
        else:
            field.extend(val)
    elif isinstance(val, dict):
        for key, value in val.items():
            assign_proto(field, key, value)
    else:
        setattr(proto, name, val)


class Top:
    """One output blob of a layer spec (output ``n`` of Function ``fn``)."""

    def __init__(self, fn, n):
        self.fn = fn
        self.n = n

    def to_proto(self):
        """The NetParameter of every layer this top depends on, names made up."""
        return to_proto(self)

    def _to_proto(self, layers, names, autonames):
        return self.fn._to_proto(layers, names, autonames)


class Function:
    """A layer spec: its type, input Tops and parameters (keywords)."""

    def __init__(self, type_name, inputs, params):
        for index, value in enumerate(inputs):
            if not isinstance(value, Top):
                raise TypeError(f"{type_name} input {index} is not a Top (type is {type(value)})")
        self.type_name = type_name
        self.inputs = inputs
        self.params = dict(params)
        self.ntop = self.params.pop("ntop", 1)
        self.in_place = self.params.pop("in_place", False)
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _autoname(self, autonames):
        autonames[self.type_name] += 1
        return f"{self.type_name}{autonames[self.type_name]}"

    def _top_name(self, top, names, autonames):
        if top not in names:
            names[top] = top.fn._autoname(autonames)
        return names[top]

    def _name(self, names, autonames):
        """The layer's name: its own when given, else its first top's, else made up."""
        if self not in names:
            names[self] = (self._top_name(self.tops[0], names, autonames) if self.ntop > 0
                           else self._autoname(autonames))
        return names[self]

    def _to_proto(self, layers, names, autonames):
        if self in layers:
            return
        bottoms = []
        for top in self.inputs:
            top._to_proto(layers, names, autonames)
            bottoms.append(layers[top.fn].top[top.n])
        layer = caffe_pb2.LayerParameter()
        layer.type = self.type_name
        layer.bottom.extend(bottoms)
        if self.in_place:
            layer.top.extend(layer.bottom)
        else:
            layer.top.extend(self._top_name(top, names, autonames) for top in self.tops)
        layer.name = self._name(names, autonames)
        own = _PARAM_NAMES.get(self.type_name) or _PARAM_NAMES_SHARED.get(self.type_name)
        for key, value in self.params.items():
            if key.endswith("param"):
                assign_proto(layer, key, value)
                continue
            try:
                if own is None:
                    raise AttributeError(key)
                assign_proto(getattr(layer, f"{own}_param"), key, value)
            except AttributeError:
                assign_proto(layer, key, value)
        layers[self] = layer


class _MissingTop(AttributeError, KeyError):
    """A NetSpec attribute never assigned (a KeyError, as in pycaffe, and an AttributeError)."""


class NetSpec:
    """Named Tops, assigned as attributes (or items); to_proto() gives the NetParameter of
    every layer they need, in assignment order, named after the attributes."""

    def __init__(self):
        super().__setattr__("tops", collections.OrderedDict())

    def __setattr__(self, name, value):
        self.tops[name] = value

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        try:
            return self.tops[name]
        except KeyError:
            raise _MissingTop(name) from None

    def __setitem__(self, key, value):
        self.__setattr__(key, value)

    def __getitem__(self, item):
        return self.__getattr__(item)

    def to_proto(self):
        names = {value: key for key, value in self.tops.items()}
        autonames = collections.Counter()
        layers = collections.OrderedDict()
        for top in self.tops.values():
            top._to_proto(layers, names, autonames)
        net = caffe_pb2.NetParameter()
        net.layer.extend(layers.values())
        return net


def to_proto(*tops):
    """The NetParameter of every layer the given Tops depend on, every name made up."""
    layers = collections.OrderedDict()
    autonames = collections.Counter()
    for top in tops:
        top.fn._to_proto(layers, {}, autonames)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


class Layers:
    """``layers.Convolution(bottom, kernel_size=3)``: a layer spec; returns its Top, a
    tuple of Tops (``ntop`` > 1) or, with ``ntop=0``, the Function itself."""

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)

        def layer(*args, **kwargs):
            fn = Function(name, args, kwargs)
            if fn.ntop == 0:
                return fn
            return fn.tops[0] if fn.ntop == 1 else fn.tops
        layer.__name__ = name
        return layer


class _Constants:
    def __init__(self, message_name):
        self._message_name = message_name

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return getattr(getattr(caffe_pb2, self._message_name), name)


class Parameters:
    """``params.Pooling.MAX``: the enum values of ``<Type>Parameter`` messages."""

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Constants(f"{name}Parameter")


layers = Layers()
params = Parameters()
