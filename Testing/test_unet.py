import dataclasses

import pytest
import torch

from SACDiffLib.config import preset
from SACDiffLib.unet import ResBlock, UNet, count_parameters


def test_tiny_forward_shapes_conditional_and_not():
    cfg = preset("tiny").model
    net = UNet(cfg)
    x, c, t = torch.randn(3, 1, 32, 32), torch.ones(3, 1, 32, 32), torch.tensor([1, 50, 100])
    assert net(x, c, t).shape == (3, 1, 32, 32)
    assert net.conv_in.in_channels == 2  # [x_t ⊕ c]
    with pytest.raises(ValueError):
        net(x, None, t)
    plain = UNet(dataclasses.replace(cfg, conditional=False))
    assert plain.conv_in.in_channels == 1
    assert plain(x, None, t).shape == (3, 1, 32, 32)


def test_paper_structure_matches_fig2():
    net = UNet(preset("paper").model)
    assert len(net.down_blocks) == 7 and len(net.up_blocks) == 7
    assert all(len(b) == 3 for b in net.down_blocks) and all(len(b) == 3 for b in net.up_blocks)
    assert len(net.bottleneck) == 2
    assert sum(isinstance(m, ResBlock) for m in net.modules()) == 7 * 3 * 2 + 2
    assert preset("paper").model.size_multiple == 128
    assert count_parameters(net) > 1_000_000


def test_mask_changes_the_output_once_trained_weights_are_nonzero():
    torch.manual_seed(0)
    net = UNet(preset("tiny").model)
    torch.nn.init.normal_(net.conv_out.weight)
    x, t = torch.randn(1, 1, 32, 32), torch.tensor([10])
    a = net(x, torch.zeros(1, 1, 32, 32), t)
    b = net(x, torch.ones(1, 1, 32, 32), t)
    assert not torch.allclose(a, b)
