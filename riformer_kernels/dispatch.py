"""Backend registry and selection: which implementation runs a block, and why.

Selection order of precedence: `use_backend(...)` (global setter or context manager), then the
environment variable RIFORMER_BACKEND, then the block's own `backend` attribute (what
`rk.convert(model, backend=...)` sets), then `auto`. `auto` walks a per-device preference list and
takes the first backend that is usable and supports the call; `explain_dispatch` says which one
that is and why each one before it was skipped. An explicitly requested backend that cannot run
raises `BackendUnavailableError` with the reason instead of silently falling back.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

BACKEND_NAMES = ('reference', 'torch', 'triton', 'cuda', 'cpu')
# Fastest first. The interpreter-run Triton backend is never auto-picked for CPU tensors: it is a
# test vehicle, orders of magnitude slower than the others there. On CPUs the `torch` fold is
# slower than the eager reference (benchmarks/results/cpu_s12.md: 0.75-0.97x forward, S12 stage
# shapes), so without the `cpu` kernels auto runs the reference; `torch` stays selectable.
AUTO_ORDER = {
    'cuda': ('triton', 'cuda', 'torch', 'reference'),
    'cpu': ('cpu', 'reference'),
}
DEFAULT_AUTO_ORDER = ('torch', 'reference')


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here (the message says why)."""


@dataclass
class Backend:
    """One implementation of the block forward.

    availability() -> None when usable in this process, else the reason it is not.
    supports(block, x) -> None when it can run this call, else the reason it cannot.
    auto_declines(block, x) -> None, or why `auto` passes this call on to the next backend
        although this one can run it (measured slower than that one for the call's class; see
        docs/design.md section 5). Only `auto` asks; a backend requested by name runs anyway.
    forward(block, x, dp1, dp2) -> output; dp1/dp2 are per-sample drop-path factors or None.
    """
    name: str
    availability: Callable[[], str | None]
    supports: Callable[[object, torch.Tensor], str | None] = field(default=lambda block, x: None)
    forward: Callable | None = None
    auto_declines: Callable[[object, torch.Tensor], str | None] = field(
        default=lambda block, x: None)
    # note(block, x) -> None, or what the backend does differently for this call (e.g. under
    # autocast); explain_dispatch prints it for the chosen backend.
    note: Callable[[object, torch.Tensor], str | None] = field(default=lambda block, x: None)


_REGISTRY: dict[str, Backend] = {}
_selected: str | None = None


def register_backend(backend: Backend) -> None:
    if backend.name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend name {backend.name!r}; expected one of {BACKEND_NAMES}")
    _REGISTRY[backend.name] = backend


def _not_built(name: str) -> str:
    return f"the {name} backend has no kernels in this build yet"


def get_backend(name: str) -> Backend:
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKEND_NAMES}")
    return _REGISTRY.get(name) or Backend(name, availability=lambda: _not_built(name))


class BackendInfo(NamedTuple):
    usable: bool
    reason: str


def available_backends() -> dict[str, BackendInfo]:
    """Every backend with whether it is usable in this process and, if not, why."""
    result = {}
    for name in BACKEND_NAMES:
        reason = get_backend(name).availability()
        result[name] = BackendInfo(reason is None, reason or 'usable')
    return result


def requested_backend(block=None) -> str:
    """The backend asked for now: use_backend(...) > $RIFORMER_BACKEND > the block's own
    `backend` attribute (set by `rk.convert(model, backend=...)`) > 'auto'."""
    name = _selected or os.environ.get('RIFORMER_BACKEND', '').strip() or 'auto'
    if name != 'auto' and name not in BACKEND_NAMES:
        raise ValueError(f"RIFORMER_BACKEND={name!r} is not a backend; choose one of "
                         f"{('auto',) + BACKEND_NAMES}")
    if name == 'auto' and block is not None:
        name = getattr(block, 'backend', None) or 'auto'
        if name != 'auto' and name not in BACKEND_NAMES:
            raise ValueError(f"block.backend={name!r} is not a backend; choose one of "
                             f"{('auto',) + BACKEND_NAMES}")
    return name


class use_backend:
    """Select a backend: `rk.use_backend('torch')` sets it globally; `with rk.use_backend(...)`
    sets it for the block and restores the previous choice on exit. 'auto' restores automatic
    selection; None clears the setting so RIFORMER_BACKEND applies again."""

    def __init__(self, name: str | None):
        global _selected
        if name is not None and name != 'auto' and name not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKEND_NAMES}")
        self._previous = _selected
        _selected = name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _selected
        _selected = self._previous
        return False


class Choice(NamedTuple):
    backend: Backend
    skipped: tuple  # ((name, reason), ...) for backends auto tried first


def _why_not(backend: Backend, block, x) -> str | None:
    return backend.availability() or backend.supports(block, x)


def choose_backend(block, x: torch.Tensor) -> Choice:
    name = requested_backend(block)
    if name != 'auto':
        backend = get_backend(name)
        reason = _why_not(backend, block, x)
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r} cannot run this call: {reason}")
        return Choice(backend, ())
    skipped = []
    for candidate in AUTO_ORDER.get(x.device.type, DEFAULT_AUTO_ORDER):
        backend = get_backend(candidate)
        reason = _why_not(backend, block, x) or backend.auto_declines(block, x)
        if reason is None:
            return Choice(backend, tuple(skipped))
        skipped.append((candidate, reason))
    raise BackendUnavailableError(f"no backend can run this call: {skipped}")


def explain_dispatch(block, x: torch.Tensor) -> str:
    """A readable account of which backend `block(x)` would run and why."""
    choice = choose_backend(block, x)
    lines = [f"requested: {requested_backend(block)}", f"chosen: {choice.backend.name}"]
    lines += [f"skipped {name}: {reason}" for name, reason in choice.skipped]
    note = choice.backend.note(block, x)
    if note:
        lines.append(f"note: {note}")
    return "\n".join(lines)


# Training memory mode of the fused backends. recompute=True: the backward recomputes the hidden
# activation u = fc1(norm2(y)) from x (saved: x and O(N*C) statistics). recompute=False: the
# forward also saves u (4x the size of x) and the backward reads it instead of running fc1 again.
_recompute: bool | None = None


def set_recompute(value: bool | None) -> None:
    """Set the memory mode of every block: True (recompute u in the backward), False (save u in
    the forward), or None to let each block's own `recompute` attribute (default True) decide."""
    global _recompute
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"set_recompute expects True, False or None, got {value!r}")
    _recompute = value


def recompute_for(block) -> bool:
    """Whether `block`'s backward recomputes u: the global setting if set, else the block's
    `recompute` attribute, else True."""
    if _recompute is not None:
        return _recompute
    return bool(getattr(block, 'recompute', True))
