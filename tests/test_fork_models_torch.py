"""A SegNet-style net (BN in both modes, MAX pooling masks, Upsample) against an independent torch
forward of the same weights (scripts/fork_models_check.py torch_forward; OpenCV has neither BN
nor Upsample). torch is a test-only dependency: skipped without it."""

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
try:
    import fork_models_check as check
finally:
    sys.path.remove(str(ROOT / "scripts"))

pytest.importorskip("torch")


def _block(name, bottom, out, mode):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
            f'convolution_param {{ num_output: {out} kernel_size: 3 pad: 1 }} }}\n'
            f'layer {{ name: "{name}_bn" type: "BN" bottom: "{name}" top: "{name}" bn_param {{ bn_mode: {mode} }} }}\n'
            f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}" }}\n')


def _pool(name, bottom):
    return (f'layer {{ name: "{name}" type: "Pooling" bottom: "{bottom}" top: "{name}" top: "{name}_mask" '
            'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n')


def _up(name, bottom, mask, size):
    h, w = size
    return (f'layer {{ name: "{name}" type: "Upsample" bottom: "{bottom}" bottom: "{mask}" top: "{name}" '
            f'upsample_param {{ scale: 2 upsample_h: {h} upsample_w: {w} }} }}\n')


@pytest.mark.parametrize("mode", ["INFERENCE", "LEARN"])
def test_segnet_style_net_matches_torch(mode):
    text = ('name: "mini-segnet"\n' + check._input("data", 2, 3, 13, 18) +
            _block("e1", "data", 6, mode) + _pool("p1", "e1") +
            _block("e2", "p1", 8, mode) + _pool("p2", "e2") +
            _up("u2", "p2", "p2_mask", (7, 9)) + _block("d2", "u2", 6, mode) +
            _up("u1", "d2", "p1_mask", (13, 18)) + _block("d1", "u1", 4, mode) +
            'layer { name: "prob" type: "Softmax" bottom: "d1" top: "prob" }\n')
    result = check.compare_torch(text)
    (diff, scale), = result.values()
    assert scale > 0.1 and diff < 1e-12, result
