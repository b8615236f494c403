"""The Caffe schema: the generated module is caffe.proto plus the fork fragments, it keeps every BVLC
field as it is, and key field numbers are Caffe's."""

import pathlib
import subprocess
import sys

import pytest

from google.protobuf import descriptor_pb2

from brewnet.netdef import caffe_pb2, forks

ROOT = pathlib.Path(__file__).resolve().parent.parent
NETDEF = ROOT / "netdef"


def _protoc(tmp_path, proto_text, *outputs):
    pytest.importorskip("grpc_tools")
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "caffe.proto").write_text(proto_text, encoding="utf-8")
    return subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{src}", *outputs, "caffe.proto"],
                          capture_output=True, text=True)


def _descriptor_set(tmp_path, proto_text, name):
    out = tmp_path / name
    done = _protoc(tmp_path, proto_text, f"--descriptor_set_out={out}", "--include_imports")
    assert done.returncode == 0, done.stderr
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return files.file[0]


def test_generated_module_does_not_drift(tmp_path):
    pytest.importorskip("grpc_tools")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_schema
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    make_schema.build(tmp_path)
    generated = (tmp_path / "caffe_pb2.py").read_bytes()
    assert b"import caffe_pb2" not in generated  # nothing would need a relative-import fix
    assert generated == (NETDEF / "caffe_pb2.py").read_bytes(), "run scripts/make_schema.py"
    assert (tmp_path / "caffe_superset.proto").read_bytes() == (NETDEF / "caffe_superset.proto").read_bytes()


def _fields(message):
    return {f.name: f for f in message.field}


def _assert_contains(bvlc, superset, where):
    """Every message, field (number, type, label, default) and enum value of ``bvlc`` is in ``superset``."""
    messages = {m.name: m for m in superset.message_type} if hasattr(superset, "message_type") else \
        {m.name: m for m in superset.nested_type}
    enums = {e.name: e for e in superset.enum_type}
    for enum in bvlc.enum_type:
        values = {v.name: v.number for v in enums[enum.name].value}
        for v in enum.value:
            assert values.get(v.name) == v.number, f"{where}{enum.name}.{v.name}"
    for message in (bvlc.message_type if hasattr(bvlc, "message_type") else bvlc.nested_type):
        theirs = messages.get(message.name)
        assert theirs is not None, f"{where}{message.name} missing"
        fields = _fields(theirs)
        for f in message.field:
            g = fields.get(f.name)
            assert g is not None, f"{where}{message.name}.{f.name} missing"
            assert (g.number, g.type, g.label, g.type_name, g.default_value) == \
                (f.number, f.type, f.label, f.type_name, f.default_value), f"{where}{message.name}.{f.name}"
            assert g.options.packed == f.options.packed, f"{where}{message.name}.{f.name} packing"
        _assert_contains(message, theirs, f"{where}{message.name}.")


def test_superset_keeps_every_bvlc_field(tmp_path):
    bvlc = _descriptor_set(tmp_path, (NETDEF / "caffe.proto").read_text(encoding="utf-8"), "bvlc.pb")
    superset = _descriptor_set(tmp_path, forks.superset_text(), "superset.pb")  # what caffe_pb2 is built from
    assert len(bvlc.message_type) == 63
    _assert_contains(bvlc, superset, "")


BASE = """syntax = "proto2";
package caffe;
message PoolingParameter {
  optional uint32 pad = 4 [default = 0]; // a comment with { a brace
}
message LayerParameter {
  optional string name = 1;
}
"""


def _fragment(tmp_path, name, text):
    path = tmp_path / f"{name}.proto"
    path.write_text(text, encoding="utf-8")
    return forks.Fork(str(path))


def test_fragments_merge_into_their_messages_and_add_new_ones(tmp_path):
    a = _fragment(tmp_path, "a", "// fork: A\n// repo: someone/caffe\n// layers: Foo\n"
                  "message PoolingParameter {\n  optional bool ceil_mode = 13 [default = true];\n}\n"
                  "message LayerParameter {\n  optional FooParameter foo_param = 300;\n}\n"
                  "message FooParameter {\n  enum Mode { X = 0; }\n  optional Mode mode = 1;\n}\n")
    text = forks.superset_text(BASE, [a])
    desc = _descriptor_set(tmp_path, text, "merged.pb")
    messages = {m.name: m for m in desc.message_type}
    assert _fields(messages["PoolingParameter"])["ceil_mode"].number == 13
    assert _fields(messages["LayerParameter"])["foo_param"].number == 300
    assert messages["FooParameter"].enum_type[0].name == "Mode"
    assert (a.name, a.repo, a.layers, a.describe()) == ("A", "someone/caffe", ["Foo"], "A (someone/caffe)")


def test_two_forks_on_one_field_number_are_refused(tmp_path):
    a = _fragment(tmp_path, "a", "// fork: A\nmessage LayerParameter {\n  optional int32 a = 300;\n}\n")
    b = _fragment(tmp_path, "b", "// fork: B\nmessage LayerParameter {\n  optional int32 b = 300;\n}\n")
    done = _protoc(tmp_path, forks.superset_text(BASE, [a, b]), f"--python_out={tmp_path}")
    assert done.returncode != 0 and "300" in done.stderr


def test_fork_of_layer_names_the_fork():
    for fork in forks.forks():
        for layer_type in fork.layers:
            assert forks.fork_of_layer(layer_type) is fork
    assert forks.fork_of_layer("Convolution") is None


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
