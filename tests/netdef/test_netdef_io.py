"""Reading/writing prototxt and binary protos, blobs, errors, atomic writes."""

import os

import numpy
import pytest

from brewnet import netdef
from brewnet.netdef import DefinitionError, caffe_pb2

NET_WITH_TYPO = """name: "typo"
layer {
  name: "conv1"
  type: "Convolution"
  convolution_param { num_ouput: 3 }
}
"""


def test_parse_error_names_path_line_column_and_suggests():
    with pytest.raises(DefinitionError) as info:
        netdef.parse_net(NET_WITH_TYPO, "net.prototxt")
    message = str(info.value)
    assert message == ('net.prototxt:5:23: unknown field "num_ouput" in ConvolutionParameter '
                       '(did you mean "num_output"?)')
    assert "\n" not in message
    assert (info.value.line, info.value.column) == (5, 23)


def test_unknown_top_level_field_and_enum_value():
    with pytest.raises(DefinitionError, match=r'^x:1:1: unknown field "nmae" in NetParameter \(did you mean "name"\?\)$'):
        netdef.parse_net('nmae: "a"', "x")
    with pytest.raises(DefinitionError, match=r"^x:1:26: unknown value TRAN for Phase \(did you mean TRAIN\?\)$"):
        netdef.parse_net("layer { include { phase: TRAN } }", "x")


def test_other_syntax_errors_drop_the_quoted_line():
    with pytest.raises(DefinitionError) as info:
        netdef.parse_net('layer { name: conv1 }', "x.prototxt")
    assert str(info.value) == "x.prototxt:1:15: name: Expected string but found: 'conv1'"
    with pytest.raises(DefinitionError, match=r'^x:1:7: Expected "}"'):
        netdef.parse_net('layer {\n', "x")


def test_a_bad_value_names_its_field():
    text = 'layer {\n  name: "c"\n  type: "Convolution"\n  convolution_param {\n    num_output: ten\n  }\n}\n'
    with pytest.raises(DefinitionError) as info:
        netdef.parse_net(text, "n.prototxt")
    assert str(info.value) == "n.prototxt:5:17: num_output: Couldn't parse integer: ten"
    with pytest.raises(DefinitionError, match=r"^s:1:10: base_lr: Couldn't parse float: abc$"):
        netdef.parse_solver("base_lr: abc", "s")


def test_parse_errors_never_echo_control_characters():
    with pytest.raises(DefinitionError) as info:
        netdef.parse_solver('type: "x" base_lr: \x1b[2J', "s")
    message = str(info.value)
    assert "\x1b" not in message and "\\x1b" in message and message.isprintable()


def test_read_net_missing_file(tmp_path):
    path = tmp_path / "nope.prototxt"
    with pytest.raises(DefinitionError, match="nope.prototxt: no such file"):
        netdef.read_net(path)


def test_read_net_from_file(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text('name: "n"\nlayer { name: "d" type: "Input" top: "data" '
                    'input_param { shape { dim: 1 dim: 2 } } }\n')
    net = netdef.read_net(path)
    assert net.name == "n" and net.layer[0].input_param.shape[0].dim == [1, 2]


def _small_net():
    net = caffe_pb2.NetParameter(name="small")
    layer = net.layer.add(name="ip", type="InnerProduct", bottom=["data"], top=["ip"])
    layer.blobs.append(netdef.array_to_blob(numpy.arange(6, dtype=numpy.float32).reshape(2, 3)))
    layer.blobs.append(netdef.array_to_blob(numpy.array([0.5, -1.5], dtype=numpy.float32)))
    return net


def test_binary_and_text_round_trip(tmp_path):
    net = _small_net()
    netdef.write_binary(net, tmp_path / "a.caffemodel")
    assert netdef.read_weights(tmp_path / "a.caffemodel") == net
    netdef.write_text(net, tmp_path / "a.prototxt")
    assert netdef.read_net(tmp_path / "a.prototxt") == net


def test_truncated_binary_is_a_definition_error(tmp_path):
    data = _small_net().SerializeToString()
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(data[: len(data) - 7])
    with pytest.raises(DefinitionError) as info:
        netdef.read_weights(path)
    assert str(info.value) == f"{path}: not a valid NetParameter (truncated or not a .caffemodel)"


def test_text_file_given_as_weights(tmp_path):
    path = tmp_path / "net.caffemodel"
    path.write_text('name: "x"\nlayer { name: "a" }\n')
    with pytest.raises(DefinitionError, match="looks like a text prototxt"):
        netdef.read_weights(path)


def test_empty_and_missing_weights(tmp_path):
    (tmp_path / "empty.caffemodel").write_bytes(b"")
    with pytest.raises(DefinitionError, match="empty"):
        netdef.read_weights(tmp_path / "empty.caffemodel")
    with pytest.raises(DefinitionError, match="missing.caffemodel: no such file"):
        netdef.read_weights(tmp_path / "missing.caffemodel")


def test_blob_to_array_shapes_and_doubles():
    legacy = caffe_pb2.BlobProto(num=1, channels=2, height=1, width=3, data=range(6))
    assert netdef.blob_to_array(legacy).shape == (1, 2, 1, 3)
    doubles = caffe_pb2.BlobProto(double_data=[1.25, 2.5], data=[9, 9])
    doubles.shape.dim.append(2)
    array = netdef.blob_to_array(doubles)
    assert array.dtype == numpy.float32 and array.tolist() == [1.25, 2.5]
    bad = caffe_pb2.BlobProto(data=[1, 2, 3])
    bad.shape.dim.extend([2, 2])
    with pytest.raises(DefinitionError, match="needs 4 values but holds 3"):
        netdef.blob_to_array(bad)


def test_array_to_blob_matches_the_plain_encoding():
    rng = numpy.random.default_rng(0)
    data = rng.standard_normal((3, 4, 5)).astype(numpy.float32)
    diff = rng.standard_normal((3, 4, 5))
    blob = netdef.array_to_blob(data, diff)
    plain = caffe_pb2.BlobProto(data=data.ravel().tolist(), diff=diff.astype(numpy.float32).ravel().tolist())
    plain.shape.dim.extend([3, 4, 5])
    assert blob == plain
    numpy.testing.assert_array_equal(netdef.blob_to_array(blob, diff=True), diff.astype(numpy.float32))
    double = netdef.array_to_blob(diff, double=True)
    assert netdef.blob_to_array(double, numpy.float64).tolist() == diff.tolist()


def test_blobproto_mean_file_round_trip(tmp_path):
    mean = numpy.random.default_rng(1).random((1, 3, 4, 5), dtype=numpy.float32)
    netdef.write_blobproto(mean, tmp_path / "mean.binaryproto")
    numpy.testing.assert_array_equal(netdef.read_blobproto(tmp_path / "mean.binaryproto"), mean)


def test_file_over_64_mib_parses(tmp_path):
    # protobuf's classic 64 MiB stream limit must not apply to weights files
    big = numpy.arange(17 * 2**20 + 3, dtype=numpy.float32)
    net = caffe_pb2.NetParameter()
    net.layer.add(name="big").blobs.append(netdef.array_to_blob(big))
    path = tmp_path / "big.caffemodel"
    netdef.write_weights(net, path)
    assert path.stat().st_size > 64 * 2**20
    read = netdef.read_weights(path)
    numpy.testing.assert_array_equal(netdef.blob_to_array(read.layer[0].blobs[0]), big)


class _Boom(Exception):
    pass


def test_atomic_write_keeps_old_file_when_writer_raises(tmp_path):
    path = tmp_path / "model.caffemodel"
    path.write_bytes(b"old contents")
    with pytest.raises(_Boom):
        with netdef.atomic_write(path) as handle:
            handle.write(b"partial new contents")
            raise _Boom()
    assert path.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["model.caffemodel"]  # temp file removed


def test_atomic_write_replaces_on_success_and_keeps_mode(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text("old")
    os.chmod(path, 0o640)
    with netdef.atomic_write(path, "w") as handle:
        handle.write("new")
    assert path.read_text() == "new"
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["net.prototxt"]


def test_write_text_failure_leaves_target_alone(tmp_path):
    path = tmp_path / "out.prototxt"
    path.write_text("keep me")
    with pytest.raises(AttributeError):
        netdef.write_text(object(), path)
    assert path.read_text() == "keep me"
    assert os.listdir(tmp_path) == ["out.prototxt"]
