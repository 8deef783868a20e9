"""Function-preserving widening of a U-Net (``ml.widen``, used by ``dicomnode train --init-from`` with a larger
``base_width``).

Specification: the wider U-Net computes the narrow one's output, in evaluation and in training mode, for every
normalization and upsampling the factory builds, exactly when no noise is asked for; with the default noise its
copied channels differ from their originals (so they can learn something of their own) and the output moves by
little.  Anything but a larger ``base_width`` is refused with one line.
"""

from __future__ import annotations

import re

import pytest
import torch

from ml.networks import NetworkOptions, UNet, build_network, parse_options
from ml.widen import WidenError, widen_unet


def _unet(width: int, **options: object) -> UNet:
    opts = parse_options({"base_width": width, "depth": 2, "context_slices": 1, **options})
    torch.manual_seed(1)
    net = build_network(opts)
    assert isinstance(net, UNet)
    for m in net.modules():  # trained-looking normalization, not the identity a fresh one is
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.5, 0.5)
    return net


def _wider(net: UNet, width: int) -> NetworkOptions:
    return parse_options({**net.opts.to_dict(), "base_width": width})


@pytest.mark.parametrize("options", [{}, {"upsampling": "resize-conv"}, {"norm": "none"}, {"norm": "instance"}])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_the_wider_unet_computes_the_same_output(options: dict[str, object], mode: str) -> None:
    narrow = _unet(4, dropout=0.0, **options)
    wide = widen_unet(narrow, _wider(narrow, 7), noise=0.0)
    x = torch.rand(3, 3, 32, 32)
    narrow.train(mode == "train")
    wide.train(mode == "train")
    with torch.no_grad():
        torch.testing.assert_close(wide(x), narrow(x), rtol=0, atol=1e-5)
    assert sum(p.numel() for p in wide.parameters()) > 2 * sum(p.numel() for p in narrow.parameters())


def test_the_copies_are_jittered_so_they_can_learn_apart() -> None:
    narrow = _unet(4).eval()
    wide = widen_unet(narrow, _wider(narrow, 8)).eval()  # default noise
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = narrow(x), wide(x)
    assert 0 < float((a - b).abs().max()) < 0.02 * float(a.abs().max())
    first = wide.down[0][0].weight.detach()  # 8 output channels: 4 originals, 4 copies of some of them
    for j in range(4, 8):
        assert min(float((first[j] - first[i]).abs().max()) for i in range(4)) > 0
    torch.testing.assert_close(first[:4], narrow.down[0][0].weight.detach(), rtol=0, atol=0)  # the originals are kept


@pytest.mark.parametrize(("change", "message"), [
    ({"base_width": 2}, "base_width 2 is narrower than the start's 4"),
    ({"base_width": 8, "depth": 3}, "only base_width may change (depth differ)"),
    ({"base_width": 8, "context_slices": 0}, "only base_width may change (context_slices differ)"),
    ({"architecture": "cyclegan"}, "only a U-Net can be widened"),
])
def test_anything_but_a_larger_width_is_refused(change: dict[str, object], message: str) -> None:
    narrow = _unet(4)
    with pytest.raises(WidenError, match=f"^widening: {re.escape(message)}"):
        widen_unet(narrow, parse_options({**narrow.opts.to_dict(), **change}))
