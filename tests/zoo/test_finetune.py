"""Finetuning from a zoo model: weights copied by layer name, renamed layers fresh, training runs."""

import hashlib

import numpy
import pytest
from click.testing import CliRunner

import brewnet
from brewnet.cli import main

NET = """
name: "tiny"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 8 dim: 1 dim: 6 dim: 6 } shape { dim: 8 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "ip1" type: "InnerProduct" bottom: "conv1" top: "ip1"
  inner_product_param { num_output: 8 weight_filler { type: "xavier" } } }
layer { name: "%(last)s" type: "InnerProduct" bottom: "ip1" top: "score"
  inner_product_param { num_output: %(classes)d weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }
"""


@pytest.fixture
def zoo_with_tiny(tmp_path, monkeypatch):
    """A zoo model 'tiny' whose weights come from a net with a 4-class 'ip2'."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "zoo" / "tiny"
    folder.mkdir(parents=True)
    (folder / "train_val.prototxt").write_text(NET % {"last": "ip2", "classes": 4})
    source = brewnet.Net(str(folder / "train_val.prototxt"), phase=brewnet.TRAIN)
    source.save(str(folder / "tiny.caffemodel"))
    sha1 = hashlib.sha1((folder / "tiny.caffemodel").read_bytes()).hexdigest()
    (folder / "readme.md").write_text(
        f"---\nname: Tiny\ncaffemodel: tiny.caffemodel\ncaffemodel_url: tiny.caffemodel\n"
        f"license: MIT\nsha1: {sha1}\n---\n")
    monkeypatch.setenv("BREWNET_ZOO", str(tmp_path / "zoo"))
    return {name: [p.data.copy() for p in params] for name, params in source.params.items()}


def write_solver(tmp_path, max_iter=3):
    (tmp_path / "finetune.prototxt").write_text(NET % {"last": "ip2_new", "classes": 2})
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "finetune.prototxt"}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: {max_iter}\n'
        f'display: 1\nsnapshot_after_train: false\nsolver_mode: CPU\nrandom_seed: 3\n')
    return tmp_path / "solver.prototxt"


def test_copied_layers_equal_the_source_before_training(zoo_with_tiny, tmp_path):
    solver = brewnet.get_solver(str(write_solver(tmp_path)))
    report = solver.load_weights("zoo:tiny")
    assert report == {"copied": ["conv1", "ip1"], "fresh": ["ip2_new"], "ignored": ["ip2"]}
    for name in ("conv1", "ip1"):
        for got, want in zip(solver.net.params[name], zoo_with_tiny[name]):
            numpy.testing.assert_array_equal(got.data, want)
    assert solver.net.params["ip2_new"][0].shape == (2, 8)
    solver.step(3)
    assert numpy.isfinite(solver.loss)
    assert not numpy.array_equal(solver.net.params["ip1"][0].data, zoo_with_tiny["ip1"][0])


def test_lr_mult_zero_freezes_a_copied_layer(zoo_with_tiny, tmp_path):
    path = write_solver(tmp_path)
    text = (tmp_path / "finetune.prototxt").read_text().replace(
        'top: "conv1"\n  convolution_param', 'top: "conv1"\n  param { lr_mult: 0 }\n  convolution_param')
    (tmp_path / "finetune.prototxt").write_text(text)
    solver = brewnet.get_solver(str(path))
    solver.load_weights("zoo:tiny")
    solver.step(3)
    numpy.testing.assert_array_equal(solver.net.params["conv1"][0].data, zoo_with_tiny["conv1"][0])


def test_train_cli_reports_the_copy(zoo_with_tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "--solver", str(write_solver(tmp_path)), "--weights", "zoo:tiny"])
    assert result.exit_code == 0, result.output
    assert "Copied weights for layers: conv1, ip1" in result.output
    assert "initialized by their fillers: ip2_new" in result.output
    assert "Ignored layers of zoo:tiny that this net lacks: ip2" in result.output


def test_same_name_with_another_shape_advises_renaming(zoo_with_tiny, tmp_path, monkeypatch):
    path = write_solver(tmp_path)
    text = (tmp_path / "finetune.prototxt").read_text().replace('"ip2_new"', '"ip2"')
    (tmp_path / "finetune.prototxt").write_text(text)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "--solver", str(path), "--weights", "zoo:tiny"])
    assert result.exit_code != 0
    assert "ip2" in result.output and "(4 8)" in result.output and "(2 8)" in result.output
    assert "rename" in result.output and "Traceback" not in result.output
