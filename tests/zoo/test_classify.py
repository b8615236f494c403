"""`brewnet classify` with the bundled zoo:lenet_mnist on real MNIST test digits."""

import json

import numpy
import pytest
from click.testing import CliRunner
from PIL import Image

import brewnet
from brewnet.cli import main
from brewnet.layers.dataio import db

DIGITS = 30


def test_classify_labels_real_mnist_digits(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("BREWNET_ZOO", raising=False)
    images = db.read_idx(mnist_dir / "t10k-images-idx3-ubyte")[:DIGITS]
    labels = db.read_idx(mnist_dir / "t10k-labels-idx1-ubyte")[:DIGITS]
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"digit{i}.png"))
        Image.fromarray(image).save(paths[-1])
    result = CliRunner().invoke(main, ["classify", "--model", "zoo:lenet_mnist", "--json", "--top-k", "3", *paths])
    assert result.exit_code == 0, result.output
    answers = json.loads(result.output)
    predicted = [int(a["top"][0]["label"]) for a in answers]
    assert predicted == labels.tolist()
    for answer in answers:
        probs = [t["probability"] for t in answer["top"]]
        assert probs == sorted(probs, reverse=True) and 0.5 < probs[0] <= 1.0


def test_python_api_takes_zoo_names(mnist_dir, monkeypatch):
    monkeypatch.delenv("BREWNET_ZOO", raising=False)
    net = brewnet.Net("zoo:lenet_mnist", weights="zoo:lenet_mnist", phase=brewnet.TEST)
    images = db.read_idx(mnist_dir / "t10k-images-idx3-ubyte")[:64].astype(numpy.float32) * 0.00390625
    labels = db.read_idx(mnist_dir / "t10k-labels-idx1-ubyte")[:64]
    prob = brewnet.to_numpy(net.forward(data=images[:, None])["prob"])
    assert (prob.argmax(axis=1) == labels).mean() > 0.95


def test_classify_bad_image_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("BREWNET_ZOO", raising=False)
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    result = CliRunner().invoke(main, ["classify", "--model", "zoo:lenet_mnist", str(bad)])
    assert result.exit_code != 0
    assert "not_an_image.png: cannot read the image" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("content", ["pickled", "malformed"])
def test_classify_mean_npy_that_is_not_numbers_is_one_line(tmp_path, monkeypatch, content):
    monkeypatch.delenv("BREWNET_ZOO", raising=False)
    digit = tmp_path / "digit.png"
    Image.fromarray(numpy.zeros((28, 28), numpy.uint8)).save(digit)
    mean = tmp_path / "mean.npy"
    if content == "pickled":
        numpy.save(mean, numpy.array([{"run": "code"}], dtype=object), allow_pickle=True)
    else:
        mean.write_bytes(b"\x93NUMPY\x01\x00garbage")
    result = CliRunner().invoke(main, ["classify", "--model", "zoo:lenet_mnist", "--mean", str(mean),
                                       str(digit)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "mean.npy: not a numeric .npy array" in result.output
