"""The block shapes of RIFormer S12...M48: channels C and spatial size per stage and resolution.

A stage's feature map is the input resolution divided by 4, 8, 16, 32 (stem stride 4, then three
stride-2 downsamplings): 56, 28, 14, 7 at 224px and 96, 48, 24, 12 at 384px. Archs that share
embed dims share shapes (s12/s24/s36, m36/m48); each shape is benchmarked once and lists them.
"""
from __future__ import annotations

from dataclasses import dataclass

from riformer_kernels.models import ARCH_SETTINGS

STAGE_STRIDES = (4, 8, 16, 32)
RESOLUTIONS = (224, 384)


@dataclass(frozen=True)
class BlockShape:
    archs: tuple          # the archs whose stage has this shape
    stage: int            # 1..4
    res: int              # input image resolution
    channels: int
    size: int             # H = W of the stage's feature map

    @property
    def label(self) -> str:
        return f"C{self.channels} {self.size}x{self.size}"

    def input_shape(self, batch: int):
        return (batch, self.channels, self.size, self.size)


def block_shapes(archs=None, stages=None, resolutions=None) -> list[BlockShape]:
    """Every distinct block shape of the selected archs/stages/resolutions, resolution- then
    stage-major. Each shape lists every arch that has it, selected or not."""
    archs = list(archs or ARCH_SETTINGS)
    for arch in archs:
        if arch not in ARCH_SETTINGS:
            raise SystemExit(f"unknown arch {arch!r}; choose from {sorted(ARCH_SETTINGS)}")
    stages = list(stages or (1, 2, 3, 4))
    bad = [s for s in stages if s not in (1, 2, 3, 4)]
    if bad:
        raise SystemExit(f"unknown --stage {bad}; stages are 1, 2, 3, 4")
    resolutions = list(resolutions or RESOLUTIONS)
    shapes = {}
    for res in resolutions:
        for stage in stages:
            for arch in ARCH_SETTINGS:
                channels = ARCH_SETTINGS[arch]['embed_dims'][stage - 1]
                size = res // STAGE_STRIDES[stage - 1]
                shapes.setdefault((res, stage, channels, size), []).append(arch)
    return [BlockShape(tuple(a), stage, res, c, s) for (res, stage, c, s), a in shapes.items()
            if any(arch in a for arch in archs)]


def quick_shape() -> BlockShape:
    """One tiny shape for smoke tests: S12 stage 1 channels on a 14x14 map."""
    return BlockShape(('s12',), 1, 56, 64, 14)
