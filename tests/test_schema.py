"""The Caffe schema: the generated module matches caffe.proto, and key field numbers are Caffe's."""

import pathlib
import subprocess
import sys

import pytest

from brewnet.netdef import caffe_pb2

NETDEF = pathlib.Path(__file__).resolve().parent.parent / "netdef"


def test_generated_module_does_not_drift(tmp_path):
    pytest.importorskip("grpc_tools")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{NETDEF}", f"--python_out={tmp_path}",
                    str(NETDEF / "caffe.proto")], check=True, capture_output=True)
    generated = (tmp_path / "caffe_pb2.py").read_bytes()
    assert b"import caffe_pb2" not in generated  # nothing would need a relative-import fix
    assert generated == (NETDEF / "caffe_pb2.py").read_bytes(), "regenerate netdef/caffe_pb2.py"


def _number(message, field):
    return message.DESCRIPTOR.fields_by_name[field].number


@pytest.mark.parametrize("message, field, number", [
    (caffe_pb2.NetParameter, "layer", 100),
    (caffe_pb2.NetParameter, "layers", 2),
    (caffe_pb2.NetParameter, "input_shape", 8),
    (caffe_pb2.NetParameter, "state", 6),
    (caffe_pb2.BlobProto, "data", 5),
    (caffe_pb2.BlobProto, "shape", 7),
    (caffe_pb2.BlobProto, "double_data", 8),
    (caffe_pb2.LayerParameter, "blobs", 7),
    (caffe_pb2.LayerParameter, "transform_param", 100),
    (caffe_pb2.LayerParameter, "convolution_param", 106),
    (caffe_pb2.LayerParameter, "batch_norm_param", 139),
    (caffe_pb2.LayerParameter, "clip_param", 148),
    (caffe_pb2.V1LayerParameter, "layer", 1),
    (caffe_pb2.V1LayerParameter, "param", 1001),
    (caffe_pb2.SolverParameter, "type", 40),
    (caffe_pb2.SolverParameter, "solver_type", 30),
    (caffe_pb2.SolverParameter, "weights", 42),
    (caffe_pb2.SolverState, "history", 3),
])
def test_field_numbers_are_caffes(message, field, number):
    assert _number(message, field) == number


def test_blob_data_is_packed_and_enums_are_caffes():
    assert caffe_pb2.BlobProto.DESCRIPTOR.fields_by_name["data"].is_packed
    assert caffe_pb2.V1LayerParameter.LayerType.Value("SOFTMAX_LOSS") == 21
    assert caffe_pb2.V1LayerParameter.LayerType.Value("DECONVOLUTION") == 39
    assert caffe_pb2.SolverParameter.SolverType.Value("ADAM") == 5
    assert (caffe_pb2.TRAIN, caffe_pb2.TEST) == (0, 1)
    assert len(caffe_pb2.DESCRIPTOR.message_types_by_name) == 63
