"""riformer_kernels: fused RIFormer blocks (reference, torch, triton, cuda and cpu backends)."""
from . import _ext
from .block import RIFormerBlock
from .dispatch import (BackendUnavailableError, available_backends, explain_dispatch,
                       register_backend, requested_backend, set_recompute, use_backend)
from .models import (MODEL_NAMES, RIFormer, RIFormerClassifier, create_model, load_checkpoint)
from . import backends  # noqa: F401  (registers torch, cpu, triton, cuda; each says if unusable)
from .backends.cpu import cpu_isa_info, use_cpu_isa
from .capture import MixerIO, capture_mixer_io, capture_stage_outputs
from .poolformer import PoolFormer, PoolFormerBlock, PoolFormerClassifier, student_from_teacher
from .timm_teacher import poolformer_from_timm
from .onnx_export import export_onnx
from . import distill  # noqa: F401  (rk.distill: the distillation losses and trainer)
from .convert import convert

__all__ = [
    'RIFormerBlock', 'RIFormer', 'RIFormerClassifier', 'create_model', 'load_checkpoint',
    'MODEL_NAMES', 'available_backends', 'use_backend', 'explain_dispatch', 'requested_backend',
    'register_backend', 'BackendUnavailableError', 'set_recompute', 'cpu_isa_info', 'use_cpu_isa',
    'MixerIO', 'capture_mixer_io', 'capture_stage_outputs', 'PoolFormer', 'PoolFormerBlock',
    'PoolFormerClassifier', 'student_from_teacher', 'poolformer_from_timm', 'distill',
    'export_onnx', 'convert',
]
__version__ = '0.1.0'
