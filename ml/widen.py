"""Function-preserving widening of a trained U-Net (``dicomnode train --init-from`` with a larger ``base_width``).

A wider network trained from scratch costs as many steps as the narrow one took, and on two CPU cores that is
days.  Widening instead starts the wide network *at the narrow one's function* (the Net2WiderNet construction of
Chen, Goodfellow and Shlens, "Net2Net", ICLR 2016): every new channel is a copy of an existing one, and each layer
that reads a copied channel divides that channel's weights by the number of copies, so the sum it computes is
unchanged.  Batch normalization, ReLU, max pooling, nearest upsampling and the skip concatenations all act channel
by channel, so the whole U-Net computes the same output, in evaluation and in training mode (the copies' batch
statistics equal the original's).

Copies that stay exact copies get the same gradients for ever, so the new channels would never learn anything of
their own; a small relative noise on the copies' incoming weights (``noise``, 1 % of each layer's weight spread by
default) breaks that symmetry at a cost of about that much in the output.  ``noise=0`` gives the exact function.
"""

from __future__ import annotations

from dataclasses import replace
from typing import cast

import numpy as np
import torch
from torch import nn

from .networks import Architecture, NetworkOptions, UNet, build_network

__all__ = ["WidenError", "widen_unet"]


class WidenError(ValueError):
    """The two networks are not a U-Net and a wider copy of it; ``str(err)`` is one line."""


class _Space:
    """How the channels of one feature map in the wide network map to the narrow one's: ``index[j]`` is the narrow
    channel that wide channel ``j`` copies, ``count[i]`` how many wide channels copy narrow channel ``i``."""

    def __init__(self, index: np.ndarray, old: int) -> None:
        self.index = torch.as_tensor(index, dtype=torch.long)
        self.count = torch.bincount(self.index, minlength=old).to(torch.float32)
        self.old = old

    @classmethod
    def identity(cls, n: int) -> _Space:
        return cls(np.arange(n), n)

    @classmethod
    def widen(cls, old: int, new: int, rng: np.random.Generator) -> _Space:
        return cls(np.concatenate([np.arange(old), rng.integers(0, old, new - old)]), old)

    def then(self, other: _Space) -> _Space:
        """The concatenation of this map's channels and *other*'s (a U-Net skip connection)."""
        return _Space(np.concatenate([self.index.numpy(), other.index.numpy() + self.old]), self.old + other.old)


def _copy_conv(new: nn.Conv2d | nn.ConvTranspose2d, old: nn.Conv2d | nn.ConvTranspose2d, inp: _Space, out: _Space,
               noise: float, gen: torch.Generator) -> None:
    w = old.weight.detach()
    if isinstance(old, nn.ConvTranspose2d):  # (in, out, kh, kw)
        w = w[inp.index][:, out.index] / inp.count[inp.index].view(-1, 1, 1, 1)
    else:  # (out, in, kh, kw)
        w = w[out.index][:, inp.index] / inp.count[inp.index].view(1, -1, 1, 1)
    if noise > 0:
        copies = torch.arange(len(out.index)) >= out.old  # the new channels; the originals stay as they were
        spread = float(old.weight.detach().std())
        jitter = torch.randn(w.shape, generator=gen) * noise * spread
        axis = 1 if isinstance(old, nn.ConvTranspose2d) else 0
        shape = [1, 1, 1, 1]
        shape[axis] = -1
        w = w + jitter * copies.view(shape).to(w.dtype)
    new.weight.data.copy_(w)
    if old.bias is not None and new.bias is not None:
        new.bias.data.copy_(old.bias.detach()[out.index])


def _copy_norm(new: nn.Module, old: nn.Module, out: _Space) -> None:
    """Batch or instance normalization (or the identity, which has nothing to copy), channel by channel."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        src, dst = getattr(old, name, None), getattr(new, name, None)
        if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
            dst.data.copy_(src.detach()[out.index])
    src, dst = getattr(old, "num_batches_tracked", None), getattr(new, "num_batches_tracked", None)
    if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
        dst.data.copy_(src)


def _parts(block: nn.Module) -> tuple[nn.Conv2d, nn.Module, nn.Conv2d, nn.Module]:
    """(conv, norm, conv, norm) of a double convolution (conv, norm, ReLU, dropout, conv, norm, ReLU)."""
    seq = cast(nn.Sequential, block)
    return cast(nn.Conv2d, seq[0]), seq[1], cast(nn.Conv2d, seq[4]), seq[5]


def _up_conv(up: nn.Module) -> nn.Conv2d | nn.ConvTranspose2d:
    """The convolution of an upsampling step: a transposed convolution, or nearest upsampling then a convolution."""
    inner = cast(nn.Module, up.up)
    if isinstance(inner, nn.ConvTranspose2d):
        return inner
    return cast(nn.Conv2d, cast(nn.Sequential, inner)[1])


def _out_channels(block: nn.Module) -> int:
    return _parts(block)[2].out_channels


def _copy_block(new: nn.Module, old: nn.Module, inp: _Space, out: _Space, rng: np.random.Generator,
                noise: float, gen: torch.Generator) -> None:
    """A double convolution: its inner map is widened too."""
    n_conv1, n_norm1, n_conv2, n_norm2 = _parts(new)
    o_conv1, o_norm1, o_conv2, o_norm2 = _parts(old)
    inner = _Space.widen(o_conv1.out_channels, n_conv1.out_channels, rng)
    _copy_conv(n_conv1, o_conv1, inp, inner, noise, gen)
    _copy_norm(n_norm1, o_norm1, inner)
    _copy_conv(n_conv2, o_conv2, inner, out, noise, gen)
    _copy_norm(n_norm2, o_norm2, out)


def widen_unet(narrow: UNet, options: NetworkOptions, *, noise: float = 0.01, seed: int = 0) -> UNet:
    """A U-Net with *options* (the narrow one's, with a larger ``base_width``) computing *narrow*'s function."""
    old = narrow.opts
    if options.architecture is not Architecture.UNET or old.architecture is not Architecture.UNET:
        raise WidenError("widening: only a U-Net can be widened")
    if replace(options, base_width=old.base_width) != old:
        differ = sorted(k for k, v in options.to_dict().items() if k != "base_width" and old.to_dict()[k] != v)
        raise WidenError(f"widening: only base_width may change ({', '.join(differ)} differ)")
    if options.base_width < old.base_width:
        raise WidenError(f"widening: base_width {options.base_width} is narrower than the start's {old.base_width}")
    if noise < 0:
        raise WidenError(f"widening: noise must be >= 0, got {noise}")
    wide = build_network(options)
    assert isinstance(wide, UNet)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        space = _Space.identity(_parts(narrow.down[0])[0].in_channels)  # the input slices and Sobel channels
        skips = []
        for new_block, old_block in zip(wide.down, narrow.down):
            out = _Space.widen(_out_channels(old_block), _out_channels(new_block), rng)
            _copy_block(new_block, old_block, space, out, rng, noise, gen)
            skips.append(out)
            space = out
        out = _Space.widen(_out_channels(narrow.bottom), _out_channels(wide.bottom), rng)
        _copy_block(wide.bottom, narrow.bottom, space, out, rng, noise, gen)
        space = out
        for new_up, old_up, new_conv, old_conv, skip in zip(wide.ups, narrow.ups, wide.up_convs, narrow.up_convs,
                                                            reversed(skips)):
            conv_new, conv_old = _up_conv(new_up), _up_conv(old_up)
            up = _Space.widen(conv_old.out_channels, conv_new.out_channels, rng)
            _copy_conv(conv_new, conv_old, space, up, noise, gen)
            out = _Space.widen(_out_channels(old_conv), _out_channels(new_conv), rng)
            _copy_block(new_conv, old_conv, up.then(skip), out, rng, noise, gen)
            space = out
        _copy_conv(wide.head, narrow.head, space, _Space.identity(1), noise, gen)
    return wide
