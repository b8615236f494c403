"""`brewnet check` names the fork each fork layer type comes from (netdef/forks/*.proto), and
a fork's type that brewnet reads but does not run is a one-line error naming that fork."""

from click.testing import CliRunner

from brewnet.cli import main

NET = """name: "forks"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 4 dim: 6 dim: 6 } } }
layer { name: "dw" type: "DepthwiseConvolution" bottom: "data" top: "dw" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "shuffle" type: "ShuffleChannel" bottom: "dw" top: "shuffle" shuffle_channel_param { group: 2 } }
layer { name: "shuffle2" type: "ShuffleChannel" bottom: "shuffle" top: "shuffle2" shuffle_channel_param { group: 2 } }
layer { name: "up" type: "Interp" bottom: "shuffle2" top: "up" interp_param { zoom_factor: 2 } }
layer { name: "relu" type: "ReLU" bottom: "up" top: "up" }
"""


def _check(tmp_path, text):
    path = tmp_path / "net.prototxt"
    path.write_text(text, encoding="utf-8")
    return CliRunner().invoke(main, ["check", str(path)]), path


def test_check_names_the_fork_of_each_fork_layer_type(tmp_path):
    result, _ = _check(tmp_path, NET)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "fork layer type DepthwiseConvolution (1 layer): from the DepthwiseConvolution " \
           "(yonghenglh6/DepthwiseConvolution) fork" in out
    assert "fork layer type ShuffleChannel (2 layers): from the ShuffleNet (farmingyard/ShuffleNet) fork" in out
    assert "fork layer type Interp (1 layer): from the DeepLab/PSPNet Interp" in out
    assert "fork layer type ReLU " not in out  # BVLC's own types are not named


def test_a_fork_type_without_an_implementation_names_its_fork(tmp_path, monkeypatch):
    from brewnet.netdef import forks

    fragment = tmp_path / "someone.proto"
    fragment.write_text("// fork: Someone's\n// repo: someone/caffe\n// layers: Frobnicate\n", encoding="utf-8")
    known = forks.forks()
    monkeypatch.setattr(forks, "forks", lambda: known + (forks.Fork(str(fragment)),))
    text = 'name: "n"\nlayer { name: "f" type: "Frobnicate" top: "x" }\n'
    result, path = _check(tmp_path, text)
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], result.output
    assert "layer 'f': type 'Frobnicate' comes from the Someone's (someone/caffe) fork" in lines[0]


def test_segnet_data_layer_is_named_too(tmp_path):
    from PIL import Image

    Image.new("RGB", (5, 4)).save(tmp_path / "a.png")
    Image.new("L", (5, 4)).save(tmp_path / "a_label.png")
    (tmp_path / "list.txt").write_text("a.png a_label.png\n")
    text = ('name: "segnet"\nlayer { name: "data" type: "DenseImageData" top: "data" top: "label" '
            f'dense_image_data_param {{ source: "{tmp_path}/list.txt" root_folder: "{tmp_path}/" batch_size: 2 }} }}\n')
    result, _ = _check(tmp_path, text)
    assert result.exit_code == 0, result.output
    assert "fork layer type DenseImageData (1 layer): from the SegNet (alexgkendall/caffe-segnet) fork" \
        in result.output
    assert "2x3x4x5, 2x1x4x5" in result.output  # the real layer read the first pair
