"""benchmarks/bytes_moved.py: the byte counter itself, then the fused block against its targets."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from benchmarks.bytes_moved import measure_bytes  # noqa: E402

import riformer_kernels as rk  # noqa: E402
from helpers import make_block, random_input  # noqa: E402


def test_aten_ops_count_inputs_read_and_outputs_written():
    a, b = torch.ones(100), torch.ones(100)
    m = measure_bytes(torch.add, a, b)
    assert (m['aten_read'], m['aten_write'], m['aten_ops']) == (800, 400, 1)
    assert m['total'] == 1200


def test_views_cost_nothing_and_broadcast_operands_count_their_real_extent():
    a = torch.ones(10, 10)
    assert measure_bytes(lambda: a.view(100))['total'] == 0
    row = torch.ones(10)
    m = measure_bytes(lambda: a * row.expand(10, 10))
    assert m['aten_read'] == 400 + 40 and m['aten_write'] == 400


# The aten counter above needs no triton; the Triton counter below needs triton and the
# interpreter (it instruments the interpreter's loads and stores), the fused block also the
# triton backend.
try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
needs_interpreter = pytest.mark.skipif(
    triton is None or os.environ.get('TRITON_INTERPRET') != '1',
    reason='counts Triton loads through the Triton interpreter (triton installed, '
           'TRITON_INTERPRET=1)')
needs_triton_backend = pytest.mark.skipif(not rk.available_backends()['triton'].usable,
                                          reason=rk.available_backends()['triton'].reason)

if triton is not None:
    @triton.jit
    def _gather_kernel(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        v = tl.load(src + offs, mask=mask, other=0.0)
        w = tl.load(src + offs, mask=mask, other=0.0)          # same addresses again
        tl.store(dst + offs, v + w, mask=mask)


@needs_interpreter
def test_triton_counts_masked_in_elements_distinct_per_launch():
    src, dst = torch.ones(10), torch.empty(10)
    m = measure_bytes(lambda: _gather_kernel[(1,)](src, dst, 10, BLOCK=16))
    assert m['triton_read_requests'] == 2 * 10 * 4      # two loads, 10 of 16 lanes masked in
    assert m['triton_read'] == 10 * 4                    # distinct addresses: the DRAM model
    assert m['triton_write'] == 10 * 4 and m['triton_launches'] == 1
    assert m['launches'] == [('_gather_kernel', 10 * 4, 10 * 4)]
    assert m['aten_ops'] == 0                            # the interpreter's host copies excluded
    assert torch.equal(dst, torch.full((10,), 2.0))


@needs_interpreter
@needs_triton_backend
def test_fused_block_forward_bytes_against_targets():
    """Units of |x|. Targets at docs/design.md's shape (N=8, C=64, 56x56, fp32): <=3.2 unchained,
    <=2.2 chained (see the task note). At this small test shape the O(C^2) weights and the
    O(N*C) algebra weigh more, so the bounds here add their measured share: 0.35 |x|."""
    n, c, hw = 2, 32, 32
    blocks = [make_block(c, dtype=torch.float32).eval() for _ in range(2)]
    x = random_input((n, c, hw, hw), dtype=torch.float32)
    unit = x.numel() * 4
    with torch.no_grad(), rk.use_backend('triton'):
        unchained = measure_bytes(blocks[0], x)
        y = unchained['result']
        chained = measure_bytes(blocks[1], y)
    with torch.no_grad(), rk.use_backend('reference'):
        eager = measure_bytes(blocks[0], x)
    print({k: v['total'] / unit for k, v in
           dict(unchained=unchained, chained=chained, eager=eager).items()})
    assert unchained['triton_launches'] == 2 and chained['triton_launches'] == 1
    assert unchained['total'] / unit <= 3.2 + 0.35
    assert chained['total'] / unit <= 2.2 + 0.35
    assert eager['total'] / unit >= 30
