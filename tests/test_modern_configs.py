"""configs/modern/: the generated prototxts build, end in 1000 classes and carry the published
parameter counts (learnable blobs; BatchNorm's running statistics are not parameters)."""

import subprocess
import sys
from pathlib import Path

import numpy
import pytest

import brewnet.layers.families  # noqa: F401  (registers the layer types)
from brewnet import netdef
from brewnet.layers.net import Net
from brewnet.netdef import caffe_pb2

MODERN = Path(__file__).resolve().parent.parent / "configs" / "modern"

# name -> (published parameter count, a late blob and its shape at batch 1)
PUBLISHED = {
    "resnet50": (25_557_032, "res5c", (1, 2048, 7, 7)),
    "googlenet": (6_998_552, "inception_5b/output", (1, 1024, 7, 7)),
    "inception_v3": (23_834_568, "Mixed_7c/output", (1, 2048, 8, 8)),
    "mobilenet_v1": (4_231_976, "conv6/sep", (1, 1024, 7, 7)),
    "mobilenet_v2": (3_504_872, "conv_last", (1, 1280, 7, 7)),
    "squeezenet11": (1_235_496, "fire9/concat", (1, 512, 14, 14)),
}


def build(name):
    return Net(netdef.read_net(str(MODERN / f"{name}.prototxt")), phase=caffe_pb2.TEST)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_net_builds_with_the_published_parameter_count(name):
    count, blob, shape = PUBLISHED[name]
    net = build(name)
    params = sum(b.count for layer in net.layers if layer.type != "BatchNorm" for b in layer.blobs)
    assert params == count
    assert net.blobs[blob].shape == shape
    prob = net.blobs["prob"].shape
    assert prob[:2] == (1, 1000) and numpy.prod(prob) == 1000


def test_mobilenet_v2_forward_gives_a_distribution():
    # depthwise convolutions, Clip as ReLU6, BatchNorm + Scale and residual sums in one pass
    net = build("mobilenet_v2")
    net.blobs["data"].data[...] = numpy.random.default_rng(0).standard_normal(net.blobs["data"].shape)
    net.forward_from_to()
    prob = net.blobs["prob"].data
    assert numpy.all(numpy.isfinite(prob)) and abs(float(prob.sum()) - 1.0) < 1e-4


def test_committed_prototxts_match_the_generator():
    proc = subprocess.run([sys.executable, str(MODERN / "make_nets.py"), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["googlenet", "mobilenet_v2", "squeezenet11"])
def test_pytorch_translation_has_the_same_parameters_and_classes(name):
    # scripts/torch_net.py (benchmarks only) translates the same DAG: same parameter count, 1000 logits
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(MODERN.parent.parent / "scripts"))
    try:
        from torch_net import torch_model
    finally:
        sys.path.pop(0)
    model, shape = torch_model(netdef.read_net(str(MODERN / f"{name}.prototxt")))
    assert shape[1:] == list(build(name).blobs["data"].shape[1:])
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name][0]
    with torch.no_grad():
        assert tuple(model.eval()(torch.zeros([2] + shape[1:])).shape) == (2, 1000)


def test_benchmark_knows_the_modern_nets_and_their_groups():
    import importlib.util

    path = MODERN.parent.parent / "scripts" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("benchmark_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert set(bench.NET_GROUPS["modern"]) == set(PUBLISHED)
    assert bench.NET_GROUPS["all"] == bench.NET_GROUPS["classic"] + bench.NET_GROUPS["modern"]
    for name in PUBLISHED:
        assert bench.NETS[name]["batch"] == 8
        train = bench.train_net_param(bench.NETS[name], 8)
        assert train.layer[0].input_param.shape[0].dim[0] == 8
        assert train.layer[-1].type == "SoftmaxWithLoss"
