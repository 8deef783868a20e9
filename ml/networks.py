"""Network definitions and the single factory that builds them from options.

* :class:`UNet` - the paired U-Net of the DICOM paper (two 3x3 convolutions with
  dropout between them, 2x2 max pooling, channels doubling; 2x2 transposed
  up-convolution or resize+conv, skip concatenation, final 1x1 convolution).
  Its input is the slice (plus optional neighbouring slices, "2.5D") and, when
  enabled, the Sobel x / y gradients of the centre slice, computed inside the
  network by a fixed (non-trainable) layer so inference and training agree.
* :class:`ResnetGenerator` / :class:`PatchDiscriminator` - the CycleGAN pair
  (ResNet generator with reflection padding and instance norm, 70x70 PatchGAN).

Every option string is turned into an enum once, in :func:`parse_options`, and
rejected early with a message that names the offending argument.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "Architecture",
    "NetworkOptions",
    "Norm",
    "OptionError",
    "Padding",
    "PatchDiscriminator",
    "ResnetGenerator",
    "SobelLayer",
    "UNet",
    "Upsampling",
    "build_discriminator",
    "build_network",
    "parse_options",
]


class OptionError(ValueError):
    """An invalid network/training option; ``str(err)`` names the argument."""


class Architecture(str, enum.Enum):
    UNET = "unet"
    CYCLEGAN = "cyclegan"


class Norm(str, enum.Enum):
    NONE = "none"
    BATCH = "batch"
    INSTANCE = "instance"


class Upsampling(str, enum.Enum):
    TRANSPOSED = "transposed"
    RESIZE_CONV = "resize-conv"


class Padding(str, enum.Enum):
    REFLECT = "reflect"
    ZEROS = "zeros"
    REPLICATE = "replicate"


def _enum(kind: type[enum.Enum], value: Any, arg: str) -> Any:
    if isinstance(value, kind):
        return value
    try:
        return kind(str(value).lower())
    except ValueError:
        allowed = ", ".join(m.value for m in kind)  # type: ignore[attr-defined]
        raise OptionError(f"{arg}: {value!r} is not one of {allowed}") from None


@dataclass(frozen=True)
class NetworkOptions:
    """Everything needed to rebuild a network; stored in checkpoint metadata."""

    architecture: Architecture = Architecture.UNET
    # U-Net
    base_width: int = 16
    depth: int = 4  # number of pooling steps
    dropout: float = 0.1
    norm: Norm = Norm.BATCH
    upsampling: Upsampling = Upsampling.TRANSPOSED
    sobel: bool = True
    context_slices: int = 0  # neighbours on each side (2.5D): 1 -> 3 input slices
    # CycleGAN generator / discriminator
    ngf: int = 64
    n_blocks: int = 9
    ndf: int = 64
    gen_norm: Norm = Norm.INSTANCE
    padding: Padding = Padding.REFLECT

    @property
    def in_slices(self) -> int:
        return 2 * self.context_slices + 1

    @property
    def multiple(self) -> int:
        """In-plane sizes must be a multiple of this (inference pads to it)."""
        if self.architecture is Architecture.UNET:
            return 2**self.depth
        return 4  # two stride-2 downsamplings in the ResNet generator

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in d.items()}


def parse_options(values: Mapping[str, Any] | None = None, **overrides: Any) -> NetworkOptions:
    """Validate raw (e.g. JSON or CLI) values into :class:`NetworkOptions`.

    Unknown keys, wrong types and out-of-range numbers raise :class:`OptionError`
    naming the key.
    """
    raw: dict[str, Any] = dict(values or {})
    raw.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(NetworkOptions)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise OptionError(f"{unknown[0]}: unknown network option (known: {', '.join(sorted(known))})")
    out: dict[str, Any] = {}
    enums = {"architecture": Architecture, "norm": Norm, "upsampling": Upsampling, "gen_norm": Norm, "padding": Padding}
    for key, value in raw.items():
        if key in enums:
            out[key] = _enum(enums[key], value, key)
        elif key == "sobel":
            if not isinstance(value, bool):
                raise OptionError(f"sobel: expected true/false, got {value!r}")
            out[key] = value
        elif key == "dropout":
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise OptionError(f"dropout: expected a number, got {value!r}") from None
            if not 0.0 <= v < 1.0:
                raise OptionError(f"dropout: must be in [0, 1), got {v}")
            out[key] = v
        else:
            if isinstance(value, bool) or not isinstance(value, int):
                raise OptionError(f"{key}: expected an integer, got {value!r}")
            minimum = {"base_width": 1, "depth": 1, "context_slices": 0, "ngf": 1, "n_blocks": 0, "ndf": 1}[key]
            if value < minimum:
                raise OptionError(f"{key}: must be >= {minimum}, got {value}")
            out[key] = value
    return NetworkOptions(**out)


def _norm2d(norm: Norm, channels: int) -> nn.Module:
    if norm is Norm.BATCH:
        return nn.BatchNorm2d(channels)
    if norm is Norm.INSTANCE:
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class SobelLayer(nn.Module):
    """Fixed Sobel x / y gradients of a (N, 1, H, W) tensor, replicate-padded.

    Matches ``scipy.ndimage.sobel(img, axis=1)`` (x: along columns) and
    ``axis=0`` (y: along rows) with ``mode="nearest"``.
    """

    def __init__(self) -> None:
        super().__init__()
        smooth = torch.tensor([1.0, 2.0, 1.0])
        diff = torch.tensor([-1.0, 0.0, 1.0])
        kx = torch.outer(smooth, diff)  # derivative along columns (x)
        ky = torch.outer(diff, smooth)  # derivative along rows (y)
        # conv2d is a correlation, scipy.ndimage.sobel is a correlation too
        self.register_buffer("kernel", torch.stack([kx, ky])[:, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")
        return F.conv2d(x, self.kernel.to(x.dtype))


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: Norm, dropout: float) -> None:
        bias = norm is Norm.NONE
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=bias),
            _norm2d(norm, cout),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=bias),
            _norm2d(norm, cout),
            nn.ReLU(inplace=True),
        )


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int, mode: Upsampling) -> None:
        super().__init__()
        if mode is Upsampling.TRANSPOSED:
            self.up: nn.Module = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        else:
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


class UNet(nn.Module):
    """U-Net on (N, in_slices, H, W) slices -> (N, 1, H, W), H and W multiples of 2**depth."""

    def __init__(self, opts: NetworkOptions) -> None:
        super().__init__()
        self.opts = opts
        self.sobel = SobelLayer() if opts.sobel else None
        cin = opts.in_slices + (2 if opts.sobel else 0)
        widths = [opts.base_width * 2**i for i in range(opts.depth + 1)]
        self.down = nn.ModuleList()
        for w in widths[:-1]:
            self.down.append(_DoubleConv(cin, w, opts.norm, opts.dropout))
            cin = w
        self.bottom = _DoubleConv(widths[-2], widths[-1], opts.norm, opts.dropout)
        self.ups = nn.ModuleList()
        self.up_convs = nn.ModuleList()
        for w_low, w in zip(reversed(widths[1:]), reversed(widths[:-1])):
            self.ups.append(_Up(w_low, w, opts.upsampling))
            self.up_convs.append(_DoubleConv(2 * w, w, opts.norm, opts.dropout))
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sobel is not None:
            c = self.opts.context_slices
            x = torch.cat([x, self.sobel(x[:, c : c + 1])], dim=1)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, conv, skip in zip(self.ups, self.up_convs, reversed(skips)):
            x = conv(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class _ResBlock(nn.Module):
    def __init__(self, ch: int, norm: Norm, padding: Padding) -> None:
        super().__init__()
        pm = padding.value
        self.body = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1, padding_mode=pm, bias=norm is Norm.NONE),
            _norm2d(norm, ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(ch, ch, 3, padding=1, padding_mode=pm, bias=norm is Norm.NONE),
            _norm2d(norm, ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """CycleGAN ResNet generator: 7x7 stem, two stride-2 downs, residual blocks, two ups."""

    def __init__(self, opts: NetworkOptions) -> None:
        super().__init__()
        self.opts = opts
        ngf, norm, pm = opts.ngf, opts.gen_norm, opts.padding.value
        bias = norm is Norm.NONE
        layers: list[nn.Module] = [
            nn.Conv2d(opts.in_slices, ngf, 7, padding=3, padding_mode=pm, bias=bias),
            _norm2d(norm, ngf),
            nn.ReLU(inplace=True),
        ]
        ch = ngf
        for _ in range(2):
            layers += [nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1, bias=bias), _norm2d(norm, ch * 2), nn.ReLU(inplace=True)]
            ch *= 2
        layers += [_ResBlock(ch, norm, opts.padding) for _ in range(opts.n_blocks)]
        for _ in range(2):
            layers += [
                nn.ConvTranspose2d(ch, ch // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
                _norm2d(norm, ch // 2),
                nn.ReLU(inplace=True),
            ]
            ch //= 2
        # images live in [0, 1]; sigmoid keeps the generator output there
        layers += [nn.Conv2d(ch, 1, 7, padding=3, padding_mode=pm), nn.Sigmoid()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """70x70 PatchGAN (3 stride-2 layers of 4x4 convs, then two stride-1 layers)."""

    def __init__(self, ndf: int = 64, in_channels: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        ch = ndf
        for i, stride in enumerate((2, 2, 1)):
            nxt = ndf * min(2 ** (i + 1), 8)
            layers += [nn.Conv2d(ch, nxt, 4, stride=stride, padding=1), nn.InstanceNorm2d(nxt), nn.LeakyReLU(0.2, inplace=True)]
            ch = nxt
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def build_network(opts: NetworkOptions) -> nn.Module:
    """The one factory: a U-Net or a CycleGAN generator, as *opts* says."""
    if opts.architecture is Architecture.UNET:
        return UNet(opts)
    return ResnetGenerator(opts)


def build_discriminator(opts: NetworkOptions) -> PatchDiscriminator:
    return PatchDiscriminator(opts.ndf)


def init_weights(net: nn.Module, gain: float = 0.02) -> None:
    """Normal(0, 0.02) init as the reference CycleGAN does."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
