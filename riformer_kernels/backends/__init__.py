"""The backends, one room each; importing this package registers them with `dispatch`.

* `torch_fold`: the fold in PyTorch ops, differentiated by autograd (the independent check).
* `cpu`, `triton`: kernel sets run by `riformer_kernels.pipeline`.
* `cuda`: registered with the reason it cannot run blocks yet.

Each backend reports precisely why it cannot run (missing package, missing build, no device), so
`rk.available_backends()` and `rk.explain_dispatch()` can say it.
"""
from . import cpu, cuda, torch_fold, triton  # noqa: F401  (each registers itself)
