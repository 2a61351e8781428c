"""`RIFormerBlock`: the drop-in module. Upstream parameters and keys; the forward dispatches.

The parameters, their names and `switch_to_deploy` are upstream's (mmpretrain). `forward` checks
the input once, picks a backend (`riformer_kernels.dispatch`) and runs it; the `reference`
backend is upstream's module-by-module computation.
"""
from __future__ import annotations

import torch
from torch import nn

from . import dispatch
from .reference import (Affine, DropPath, add_channel_mlp_branch, drop_path_factors,
                        fuse_norm_and_affine, group_norm_1, reference_block_forward)


class RIFormerBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale_init_value: float = 1e-5, deploy: bool = False,
                 recompute: bool = True):
        super().__init__()
        if deploy:
            self.norm_reparam = group_norm_1(dim)
        else:
            self.norm1 = group_norm_1(dim)
            self.token_mixer = Affine(in_features=dim)
        add_channel_mlp_branch(self, dim, mlp_ratio, drop, drop_path, layer_scale_init_value)
        self.deploy = deploy
        # Fused backends' training memory mode (rk.set_recompute overrides it globally): True
        # saves x and O(N*C) statistics and recomputes the hidden activation in the backward;
        # False also saves it (4x |x|) so the backward skips fc1.
        self.recompute = recompute
        # Whether this block's output is the next fused block's input (set by the model's
        # stages for all but a stage's last block): then kernel sets whose output moments cost
        # extra work (cpu) compute them, and the next block skips its statistics pass. The
        # triton kernels produce them always. Never affects the result, only the work.
        self.chain_statistics = False

    @property
    def drop_path_prob(self) -> float:
        return self.drop_path.drop_prob if isinstance(self.drop_path, DropPath) else 0.0

    def check_input(self, x) -> None:
        """Reject what no backend computes correctly, naming the problem."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"RIFormerBlock expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"RIFormerBlock expects a 4-D (N, C, H, W) input, got shape "
                             f"{tuple(x.shape)}")
        if x.shape[1] != self.dim:
            raise ValueError(f"RIFormerBlock(dim={self.dim}) got {x.shape[1]} channels "
                             f"(input shape {tuple(x.shape)})")
        if not x.is_floating_point():
            raise TypeError(f"RIFormerBlock expects a floating-point input, got {x.dtype}")
        if x.shape[2] * x.shape[3] == 0:
            raise ValueError(f"RIFormerBlock got an empty spatial extent {tuple(x.shape)}")
        weight = self.mlp.fc1.weight
        if weight.device != x.device:
            raise ValueError(f"input is on {x.device} but the block's parameters are on "
                             f"{weight.device}; move one of them")
        if not torch.is_autocast_enabled(x.device.type):
            # Every parameter, not only fc1's: a block cast in parts would otherwise reach a
            # kernel's own dtype check (or a silent promotion in the reference).
            for name, param in self.named_parameters():
                if param.dtype != x.dtype:
                    raise TypeError(f"input dtype {x.dtype} differs from the block's parameter "
                                    f"dtype {param.dtype} ({name}); cast the block or the "
                                    f"input (or use autocast)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        backend = dispatch.choose_backend(self, x).backend
        if backend.name == 'reference':
            return reference_block_forward(self, x)
        dp1 = dp2 = None
        if self.training and self.drop_path_prob > 0:
            # Two draws in upstream's order and shape: the same seed gives the same masks. In
            # the dtype upstream's drop_path draws in: its branch's, x's promoted with the
            # layer scale's (x's outside autocast; fp32 for a half input to an fp32 block under
            # autocast, where a draw in the half dtype could round a factor across the floor).
            dtype = torch.promote_types(x.dtype, self.layer_scale_1.dtype)
            dp1 = drop_path_factors(x.shape[0], self.drop_path_prob, dtype, x.device)
            dp2 = drop_path_factors(x.shape[0], self.drop_path_prob, dtype, x.device)
        return backend.forward(self, x, dp1, dp2)

    def switch_to_deploy(self) -> None:
        """Replace norm1 + affine mixer with the equivalent `norm_reparam` (upstream's method)."""
        if self.deploy:
            return
        s, t = fuse_norm_and_affine(self.norm1, self.token_mixer)
        self.norm_reparam = group_norm_1(self.dim).to(device=s.device, dtype=s.dtype)
        self.norm_reparam.eps = self.norm1.eps   # upstream builds it from norm1's config
        self.norm_reparam.weight.data = s.detach().clone()
        self.norm_reparam.bias.data = t.detach().clone()
        del self.norm1
        del self.token_mixer
        self.deploy = True

    def extra_repr(self) -> str:
        return f"dim={self.dim}, deploy={self.deploy}, recompute={self.recompute}"


dispatch.register_backend(dispatch.Backend('reference', availability=lambda: None))
