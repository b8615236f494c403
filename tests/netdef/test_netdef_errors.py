"""Errors for text a user wrote: one line, with the place and a useful hint."""

import pytest

from brewnet import netdef


def test_unknown_param_block_of_a_fork_layer_is_explained(tmp_path):
    path = tmp_path / "fork.prototxt"
    # the center loss of ydwen/caffe-face: a fork block that brewnet's schema does not hold
    path.write_text('layer { name: "p" type: "CenterLoss" bottom: "x" top: "y"\n  center_loss_param { num_output: 10 } }\n')
    with pytest.raises(netdef.DefinitionError) as info:
        netdef.read_net(path)
    message = str(info.value)
    assert message.startswith(f"{path}:2:3: unknown field \"center_loss_param\" in LayerParameter")
    assert "Caffe fork" in message and "did you mean" not in message
