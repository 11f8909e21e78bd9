"""Benchmark shape sets and the ``Case`` a sweep measures.

Sets (``--shapes``): every BatchNorm layer of ResNet-50 (``resnet50``, at each ``--batches`` size),
BatchNorm1d 4096 x 1024 (``bn1d``), small C with huge N, 3e7 x 3 (``smallc``), many channels,
64 x 4096 x 7 x 7 (``manyc``), the Keras-only features on ResNet-50 stage shapes (``keras``), and
``tiny``/``quick``: small shapes for Triton's CPU interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

__all__ = ["Case", "RESNET50_LAYERS", "DTYPES", "LAYOUTS", "MODES", "FEATURES", "SETS",
           "resnet50_layers", "build_cases", "parse_shape", "custom_cases"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
LAYOUTS = ("nchw", "channels_last")
# forward / backward / forward_backward are training steps; inference is the eval-mode forward.
MODES = ("forward", "backward", "forward_backward", "inference")
# bn: plain batch norm (torch.nn.BatchNorm semantics); the rest are Keras-only features.
FEATURES = ("bn", "renorm", "ghost", "adjust")
SETS = ("resnet50", "bn1d", "smallc", "manyc", "keras", "tiny", "quick")

# The BatchNorm layers of torchvision's ResNet-50 (v1.5, 224 x 224 input), grouped by shape:
# (label, channels, spatial size, layers with that shape). 53 layers, 12 distinct shapes.
RESNET50_LAYERS: tuple[tuple[str, int, int, int], ...] = (
    ("stem.bn1", 64, 112, 1),
    ("layer1.bn1/bn2", 64, 56, 6),
    ("layer1.bn3/down", 256, 56, 4),
    ("layer2.0.bn1", 128, 56, 1),
    ("layer2.bn1/bn2", 128, 28, 7),
    ("layer2.bn3/down", 512, 28, 5),
    ("layer3.0.bn1", 256, 28, 1),
    ("layer3.bn1/bn2", 256, 14, 11),
    ("layer3.bn3/down", 1024, 14, 7),
    ("layer4.0.bn1", 512, 14, 1),
    ("layer4.bn1/bn2", 512, 7, 5),
    ("layer4.bn3/down", 2048, 7, 4),
)

# Keras-only features are timed on one shape per ResNet-50 stage (batch 32), ghost batches of 8.
KERAS_SHAPES = ((32, 64, 56, 56), (32, 128, 28, 28), (32, 256, 14, 14), (32, 512, 7, 7))
KERAS_VIRTUAL_BATCH = 8


def resnet50_layers(batch: int) -> list[tuple[str, tuple[int, int, int, int], int]]:
    """(label, NCHW shape, layer count) of every distinct BN shape of ResNet-50 at this batch."""
    return [(label, (batch, c, hw, hw), n) for label, c, hw, n in RESNET50_LAYERS]


@dataclass(frozen=True)
class Case:
    """One input configuration: shape, memory layout, dtype and the semantics (feature)."""

    family: str  # resnet50 | bn1d | smallc | manyc | keras | tiny
    label: str  # human-readable name (ResNet-50 layer names)
    shape: tuple[int, ...]
    layout: str  # nchw | channels_last | nc (rank-2 input)
    dtype: str  # key of DTYPES
    feature: str = "bn"  # bn | renorm | ghost | adjust
    count: int = 1  # how many layers of the network share this shape (ResNet-50 weighting)
    groups: int = 1  # ghost batches (feature "ghost")
    modes: tuple[str, ...] = field(default=MODES, compare=False)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def nbytes(self) -> int:
        """Bytes of one activation tensor (x)."""
        return self.numel * self.itemsize

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def shape_str(self) -> str:
        return "x".join(str(s) for s in self.shape)

    @property
    def key(self) -> str:
        return f"{self.family}/{self.feature}/{self.shape_str}/{self.layout}/{self.dtype}"

    def bytes_moved(self, mode: str) -> int:
        """The fewest bytes a mode must move: forward (and inference) reads x and writes y; backward
        reads x and dy and writes dx; forward_backward is both. Per-channel vectors are ignored."""
        per = {"forward": 2, "inference": 2, "backward": 3, "forward_backward": 5}[mode]
        return per * self.nbytes

    def make_input(self, device: torch.device, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
        """Random data with a non-zero mean and non-unit spread, in the case's dtype and layout."""
        x = torch.randn(self.shape, device=device, dtype=torch.float32, generator=generator)
        x = (x * 1.7 + 0.4).to(self.torch_dtype)
        if self.layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                             else torch.channels_last_3d)
        return x


def _layouts_for(shape: Sequence[int], layouts: Sequence[str]) -> list[str]:
    if len(shape) in (4, 5):
        return list(layouts)
    return ["nc"]  # rank 2/3: one layout, whatever was asked


def _pairs(dtypes: Sequence[str], layouts: Sequence[str],
           combos: Sequence[tuple[str, str]] | None) -> list[tuple[str, str]]:
    if combos:
        return list(combos)
    return [(d, lay) for d in dtypes for lay in layouts]


def build_cases(sets: Iterable[str], dtypes: Sequence[str] = ("fp32",),
                layouts: Sequence[str] = LAYOUTS, batches: Sequence[int] = (32, 256),
                combos: Sequence[tuple[str, str]] | None = None,
                modes: Sequence[str] = MODES, features: Sequence[str] = FEATURES[1:]
                ) -> list[Case]:
    """The cases of the named sets. ``combos`` ((dtype, layout) pairs) replaces the cross product
    of dtypes x layouts for 4-D shapes; rank-2 shapes get every dtype once (layout "nc")."""
    pairs = _pairs(dtypes, layouts, combos)
    dts = list(dict.fromkeys(d for d, _ in pairs))
    modes = tuple(m for m in MODES if m in modes)
    train_modes = tuple(m for m in modes if m != "inference")
    out: list[Case] = []

    def add_plain(family: str, label: str, shape: tuple[int, ...], count: int = 1) -> None:
        if len(shape) == 2:
            for d in dts:
                out.append(Case(family, label, shape, "nc", d, count=count, modes=modes))
        else:
            for d, lay in pairs:
                out.append(Case(family, label, shape, lay, d, count=count, modes=modes))

    def add_keras(family: str, shape: tuple[int, ...], vbs: int,
                  which: Sequence[tuple[str, str]] | None = None) -> None:
        if not train_modes:
            return
        for feat in features:
            for d, lay in which or pairs:
                g = shape[0] // vbs if feat == "ghost" else 1
                out.append(Case(family, f"{feat} {shape[1]}x{shape[2]}x{shape[3]}", shape, lay, d,
                                feature=feat, groups=g, modes=train_modes))

    for s in sets:
        if s == "resnet50":
            for b in batches:
                for label, shape, count in resnet50_layers(b):
                    add_plain("resnet50", label, shape, count)
        elif s == "bn1d":
            add_plain("bn1d", "BatchNorm1d 4096x1024", (4096, 1024))
        elif s == "smallc":
            add_plain("smallc", "small C, huge N", (30_000_000, 3))
        elif s == "manyc":
            add_plain("manyc", "many channels", (64, 4096, 7, 7))
        elif s == "keras":
            for shape in KERAS_SHAPES:
                add_keras("keras", shape, KERAS_VIRTUAL_BATCH)
        elif s == "tiny":  # the CPU interpreter: a program per channel (NCHW) costs ~10 ms
            add_plain("tiny", "tiny conv", (4, 4, 6, 6))
            add_plain("tiny", "tiny bn1d", (256, 32))
            add_plain("tiny", "tiny small C", (4096, 3))
            # Keras features: one dtype, channels_last (Keras's layout) when asked for
            lay = "channels_last" if any(la == "channels_last" for _, la in pairs) else pairs[0][1]
            add_keras("tiny", (8, 4, 4, 4), 4, [(pairs[0][0], lay)])
        elif s == "quick":  # the test suite's smoke run
            add_plain("tiny", "quick conv", (2, 4, 4, 4))
            for d, lay in pairs[:1]:
                out.append(Case("tiny", "quick ghost", (4, 4, 2, 2), lay, d, feature="ghost",
                                groups=2, modes=train_modes))
        else:
            raise ValueError(f"unknown shape set {s!r}; choose from {', '.join(SETS)} or all")
    # de-duplicate, keep order
    seen, uniq = set(), []
    for c in out:
        if c.key not in seen:
            seen.add(c.key)
            uniq.append(c)
    return uniq


def parse_shape(text: str) -> tuple[int, ...]:
    """'32x64x56x56' -> (32, 64, 56, 56); channels are dim 1."""
    try:
        shape = tuple(int(v) for v in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise ValueError(f"bad shape {text!r}: expected sizes joined by 'x', e.g. 32x64x56x56"
                         ) from None
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"bad shape {text!r}: need rank >= 2 and positive sizes")
    return shape


def custom_cases(shapes: Sequence[str], dtypes: Sequence[str], layouts: Sequence[str],
                 combos: Sequence[tuple[str, str]] | None = None,
                 modes: Sequence[str] = MODES) -> list[Case]:
    """Cases from ``--shape`` strings (family "custom")."""
    pairs = _pairs(dtypes, layouts, combos)
    out = []
    for text in shapes:
        shape = parse_shape(text)
        for d, lay in pairs:
            lays = _layouts_for(shape, [lay])
            c = Case("custom", text, shape, lays[0], d, modes=tuple(modes))
            if c not in out:
                out.append(c)
    return out
