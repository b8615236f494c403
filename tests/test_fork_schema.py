"""The segmentation/mobile fork fragments (netdef/forks/): their fields parse from text by the
forks' names, keep the forks' numbers where BVLC leaves them free, move to brewnet's range
1100-1199 where BVLC took them, and a binary written with a fork's own numbers still parses
with its weights intact (docs/FORKS.md, "Field numbers")."""

import pytest
from google.protobuf import text_format

from brewnet.netdef import caffe_pb2, parse_net

L = caffe_pb2.LayerParameter


@pytest.mark.parametrize("message, field, number", [
    (L, "bn_param", 45), (L, "shuffle_channel_param", 164),  # the forks' own numbers
    (L, "upsample_param", 1100), (L, "dense_image_data_param", 1101), (L, "interp_param", 1103),
    (caffe_pb2.PoolingParameter, "ceil_mode", 1102),
    (L, "embed_param", 137), (L, "tile_param", 138), (L, "input_param", 143),  # BVLC's, untouched
    (caffe_pb2.PoolingParameter, "round_mode", 13),
])
def test_field_numbers(message, field, number):
    assert message.DESCRIPTOR.fields_by_name[field].number == number


FORK_NET = """name: "forks"
layer { name: "d" type: "DenseImageData" top: "data" top: "label"
  dense_image_data_param { source: "train.txt" batch_size: 4 shuffle: true crop_width: 224 crop_height: 224 } }
layer { name: "p" type: "Pooling" bottom: "data" top: "p" top: "mask" pooling_param { pool: MAX kernel_size: 2 stride: 2 ceil_mode: false } }
layer { name: "u" type: "Upsample" bottom: "p" bottom: "mask" top: "u" upsample_param { scale: 2 upsample_h: 224 upsample_w: 224 } }
layer { name: "b" type: "BN" bottom: "u" top: "u" bn_param { bn_mode: INFERENCE scale_filler { type: "constant" value: 1 } } }
layer { name: "i" type: "Interp" bottom: "u" top: "i" interp_param { zoom_factor: 2 shrink_factor: 1 pad_beg: 0 } }
layer { name: "s" type: "ShuffleChannel" bottom: "i" top: "s" shuffle_channel_param { group: 3 } }
"""


def test_fork_fields_parse_from_text():
    net = parse_net(FORK_NET)
    d, p, u, b, i, s = net.layer
    assert (d.dense_image_data_param.crop_width, d.dense_image_data_param.shuffle) == (224, True)
    assert p.pooling_param.HasField("ceil_mode") and not p.pooling_param.ceil_mode
    assert (u.upsample_param.scale, u.upsample_param.upsample_h) == (2, 224)
    assert b.bn_param.bn_mode == caffe_pb2.BNParameter.INFERENCE
    assert (i.interp_param.zoom_factor, i.interp_param.shrink_factor) == (2, 1)
    assert s.shuffle_channel_param.group == 3


def _field(number, payload):
    """One length-delimited field of the protobuf wire format."""
    def varint(value):
        out = bytearray()
        while True:
            low, value = value & 0x7F, value >> 7
            out.append(low | (0x80 if value else 0))
            if not value:
                return bytes(out)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


@pytest.mark.parametrize("type_name, fork_number, params", [
    ("Upsample", 137, caffe_pb2.UpsampleParameter(scale=2, upsample_h=10, upsample_w=12, pad_out_h=True)),
    ("DenseImageData", 138, caffe_pb2.DenseImageDataParameter(source="list.txt", batch_size=3)),
    ("Interp", 143, caffe_pb2.InterpParameter(height=5, width=7, zoom_factor=2)),
])
def test_a_binary_with_the_forks_numbers_parses_with_its_weights(type_name, fork_number, params):
    """What the fork's own Caffe writes: its parameters at the number BVLC uses for another field.
    The bytes still parse (wire types that disagree with BVLC's field become unknown fields) and the
    blobs, which are what brewnet takes from a .caffemodel, are intact."""
    layer = caffe_pb2.LayerParameter(name="l", type=type_name)
    layer.blobs.add(data=[1.5, -2.0], shape=caffe_pb2.BlobShape(dim=[2]))
    written = caffe_pb2.NetParameter(name="n")
    raw = layer.SerializeToString() + _field(fork_number, params.SerializeToString())
    data = written.SerializeToString() + _field(100, raw)  # NetParameter.layer is 100
    net = caffe_pb2.NetParameter.FromString(data)
    assert net.layer[0].type == type_name and list(net.layer[0].blobs[0].data) == [1.5, -2.0]
    # the fork's parameters are not read from the binary: the prototxt gives them
    moved = {"Upsample": "upsample_param", "DenseImageData": "dense_image_data_param", "Interp": "interp_param"}
    assert not net.layer[0].HasField(moved[type_name])


def test_two_forks_one_layer_type_name_the_same_fork():
    from brewnet.netdef.forks import fork_of_layer

    assert fork_of_layer("BN").name == "SegNet"  # not PSPNet's BN (docs/FORKS.md)
    assert fork_of_layer("ConvolutionDepthwise").name == "ShuffleNet"
    assert fork_of_layer("DepthwiseConvolution").name == "DepthwiseConvolution"
    assert text_format.Parse("pool: MAX ceil_mode: true", caffe_pb2.PoolingParameter()).ceil_mode
