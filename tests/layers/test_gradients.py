"""Every case of tests/layers/gradient_cases.py through the float64 gradient check, and
a check that no built-in type with a backward is missing from that table."""

import importlib.util
import pathlib
import zlib

import numpy
import pytest

from brewnet.layers.gradcheck import check_gradient, make_layer
from brewnet.layers.registry import _LAYERS, known_types
from brewnet.netdef import caffe_pb2


def _load_cases():
    # tests/layers is not a package: load the table by its path
    path = pathlib.Path(__file__).with_name("gradient_cases.py")
    spec = importlib.util.spec_from_file_location("_brewnet_gradient_cases", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CASES


CASES = _load_cases()
# a factory for the user's class, whose gradient is the user's (test_python_layer.py trains one)
NOT_IN_TABLE = {"Python"}


PARAMS = [pytest.param(type_name, params, bottoms, options, id=f"{type_name}-{i}")
          for type_name, cases in sorted(CASES.items()) for i, (params, bottoms, options) in enumerate(cases)]


@pytest.mark.parametrize("type_name, params, bottoms, options", PARAMS)
def test_gradient(request, type_name, params, bottoms, options):
    options = dict(options)
    layer = make_layer(f'name: "g" type: "{type_name}" {params}', phase=options.pop("phase", caffe_pb2.TEST))
    for array in options.pop("blobs", []):
        blob = layer.make_blob(numpy.shape(array))
        blob.data[...] = array
        layer.blobs.append(blob)
    rng = numpy.random.default_rng(zlib.crc32(request.node.callspec.id.encode()))
    arrays = [rng.standard_normal(b) if isinstance(b, tuple) else numpy.asarray(b, dtype=numpy.float64)
              for b in bottoms]
    check_gradient(layer, arrays, **options)


def test_every_type_with_a_backward_has_a_case():
    builtin = [t for t in known_types() if _LAYERS[t].__module__.startswith("brewnet.layers.families.")]
    missing = [t for t in builtin if _LAYERS[t].has_backward and t not in CASES and t not in NOT_IN_TABLE]
    assert not missing, f"add gradient cases to tests/layers/gradient_cases.py for {missing}"
    unknown = sorted(set(CASES) - set(builtin))
    assert not unknown, f"gradient cases for types that are not built in: {unknown}"
    without = [t for t in CASES if not _LAYERS[t].has_backward]
    assert not without, f"gradient cases for types declared without a gradient: {without}"
