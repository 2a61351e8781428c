"""The `triton` backend's forward vs the reference.

Every tensor is built on helpers.KERNEL_DEVICE: compiled kernels on CUDA when torch sees a GPU,
else the Triton interpreter on CPU (conftest). Tests marked `gpu` need compiled kernels."""
import copy
import os

import pytest
pytest.importorskip('triton', reason='triton is not installed (optional: pip install triton)')
import torch
import torch.nn.functional as F

import riformer_kernels as rk
from riformer_kernels import dispatch, fold, pipeline
from riformer_kernels.params import BlockParams
import helpers
from helpers import (INTERPRETER, KERNEL_DEVICE as DEV, check_same_seed_as_reference, rel_err,
                     run_block)

# Blocks and inputs of this module live on the kernel-test device (their values are drawn on the
# CPU, identical on every device).
make_block = helpers.on_kernel_device(helpers.make_block)
random_input = helpers.on_kernel_device(helpers.random_input)

# Imported plainly after the triton check: an ImportError in our module must fail, not skip.
from riformer_kernels.backends.triton import forward as tfw  # noqa: E402
from riformer_kernels.backends import triton as tbk  # noqa: E402

pytestmark = pytest.mark.skipif(rk.available_backends()['triton'].reason != 'usable',
                                reason=rk.available_backends()['triton'].reason)


@pytest.fixture(autouse=True)
def nan_poisoned_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel forgets to write fails loudly."""
    calls = []
    real = tfw._empty

    def poisoned(shape, dtype, device, memory_format=torch.contiguous_format):
        calls.append(tuple(shape))
        return real(shape, dtype, device, memory_format).fill_(float('nan'))

    monkeypatch.setattr(tfw, '_empty', poisoned)
    return calls


def _truth(block, x):
    return run_block(copy.deepcopy(block).double(), x.double(), 'reference')[0]


# (shape, channels_last): every C of the spec, H*W never a multiple of the token tile, N=1 cases,
# both layouts. Token tiles are 16..128, so 10x13=130 makes C=16 take two tiles, one partial.
FP32_CASES = [
    ((2, 16, 10, 13), False), ((1, 48, 3, 5), True), ((2, 64, 5, 7), False),
    ((1, 96, 4, 5), True), ((2, 192, 3, 3), False), ((1, 320, 3, 7), True),
    ((1, 384, 2, 3), False), ((1, 512, 1, 5), True), ((1, 768, 3, 2), False),
]


@pytest.mark.parametrize('shape,channels_last', FP32_CASES)
@pytest.mark.parametrize('deploy', [False, True])
def test_fp32_within_1e5_of_fp64_reference(shape, channels_last, deploy, nan_poisoned_outputs):
    if deploy and shape[1] > 320:
        pytest.skip("the deploy form differs only in the O(C) fold: checked at smaller C "
                    "(the interpreter takes ~10 s per C=768 two-GEMM block)")
    block = make_block(shape[1], deploy=deploy, dtype=torch.float32).eval()
    x = random_input(shape, dtype=torch.float32, channels_last=channels_last)
    out = run_block(block, x, 'triton')[0]
    assert nan_poisoned_outputs, "the kernels' outputs were not allocated through _empty"
    err = rel_err(out, _truth(block, x))
    assert err <= 1e-5, err
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


def test_many_tiles_per_program_and_many_partials(monkeypatch):
    """Force the multi-tile loop (SUBTILES > 1) and a ragged last span in both kernels."""
    monkeypatch.setattr(tfw, 'TARGET_PROGRAMS', 1)
    n, c, h, w = 1, 16, 23, 29                     # T = 667: spans of 4096 / 512 tokens
    assert tfw.moments_config(n, c, h * w)['SUBTILES'] > 1
    assert tfw.mlp_config(n, c, h * w, torch.float32)['SUBTILES'] > 1
    block = make_block(c, dtype=torch.float32).eval()
    x = random_input((n, c, h, w), dtype=torch.float32)
    assert rel_err(run_block(block, x, 'triton')[0], _truth(block, x)) <= 1e-5


@pytest.mark.parametrize('channels_last', [False, True])
def test_moments_kernel_matches_fold_channel_moments_with_large_offset(channels_last):
    x = random_input((2, 24, 9, 11), offset=1e3, channels_last=channels_last).float()
    cfg = tfw.moments_config(2, 24, 99)
    pmean, pm2 = tfw.moments_partials(x)
    mean, var = tfw.merge_partials(pmean, pm2, 99, cfg['span'])
    mean64, var64 = fold.channel_moments(x.double())
    # fp32 sums of ~100 values near 1e3 round at ~1e-4 absolute (an ulp of 1e5 is 8e-3)
    assert rel_err(mean, mean64) <= 2e-6
    # variance of order 2 around 1e3: two-pass tiles + Chan merging keep it to fp32 rounding
    # of the data; E[x^2]-E[x]^2 in fp32 would lose everything (an ulp of 1e6 is 0.06)
    assert rel_err(var, var64) <= 1e-5


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('c', [32, 96])
def test_half_dtypes_within_twice_reference_error(dtype, c):
    block = make_block(c, dtype=dtype).eval()
    x = random_input((2, c, 6, 5), dtype=dtype)
    truth = _truth(block, x)
    ref_err = rel_err(run_block(block, x, 'reference')[0], truth)
    err = rel_err(run_block(block, x, 'triton')[0], truth)
    assert ref_err > 0
    assert err <= 2 * ref_err, (err, ref_err)


def _count_moments_launches(monkeypatch):
    launches = []
    real = tfw._launch_moments
    monkeypatch.setattr(tfw, '_launch_moments', lambda x: launches.append(1) or real(x))
    return launches


def test_chained_statistics_equal_unchained_and_skip_the_moments_pass(monkeypatch):
    launches = _count_moments_launches(monkeypatch)
    seq = torch.nn.Sequential(*[make_block(24, dtype=torch.float32) for _ in range(3)]).eval()
    x = random_input((2, 24, 7, 6), dtype=torch.float32)
    with torch.no_grad(), rk.use_backend('triton'):
        chained = seq(x)
        assert len(launches) == 1          # only the first block reads x for statistics
        unchained = x
        for blk in seq:
            unchained = blk(unchained.clone())   # a clone carries no statistics
        assert len(launches) == 4
    assert rel_err(chained, unchained) <= 1e-6
    with torch.no_grad(), rk.use_backend('reference'):
        truth = copy.deepcopy(seq).double()(x.double())
    assert rel_err(chained, truth) <= 1e-5


def test_in_place_change_between_blocks_forces_recomputation(monkeypatch):
    launches = _count_moments_launches(monkeypatch)
    b1, b2 = (make_block(16, dtype=torch.float32).eval() for _ in range(2))
    x = random_input((2, 16, 5, 5), dtype=torch.float32)
    with torch.no_grad(), rk.use_backend('triton'):
        y = b1(x)
        y.mul_(3.0).add_(1.0)             # stale statistics if they were reused
        out = b2(y)
        assert len(launches) == 2
        view = b1(x)[:, :, :, :]          # a view of an output is a different tensor
        b2(view)
        assert len(launches) == 4
    with torch.no_grad(), rk.use_backend('reference'):
        truth = copy.deepcopy(b2).double()(y.double())
    assert rel_err(out, truth) <= 1e-5


def test_chained_moments_record_matches_the_values():
    block = make_block(16, dtype=torch.float32).eval()
    x = random_input((2, 16, 10, 13), dtype=torch.float32)
    with torch.no_grad(), rk.use_backend('triton'):
        y = block(x)
    rec = pipeline.chained_moments(y, 'triton')
    assert rec is not None
    mean, var = tfw.merge_partials(rec.m1, rec.m2, 130, rec.span)
    mean64, var64 = fold.channel_moments(y.double())
    assert rel_err(mean, mean64) <= 1e-6 and rel_err(var, var64) <= 1e-5


@pytest.mark.parametrize('deploy', [False, True])
def test_training_forward_and_all_gradients_match_reference(deploy):
    block = make_block(16, deploy=deploy, dtype=torch.float32).train()
    x = random_input((2, 16, 3, 5), dtype=torch.float32)
    g = torch.randn(x.shape, dtype=torch.float64).to(DEV)
    out_ref, grads_ref = run_block(copy.deepcopy(block).double(), x.double(), 'reference', g)
    out, grads = run_block(block, x, 'triton', g.float())
    assert set(grads) == set(grads_ref)
    errors = {k: rel_err(grads[k], grads_ref[k]) for k in grads_ref}
    errors['out'] = rel_err(out, out_ref)
    assert max(errors.values()) <= 1e-5, errors


def test_drop_path_same_seed_gives_reference_masks():
    # drop-path masks are drawn in the block's dtype, so the reference runs in fp32 here
    block = make_block(12, dtype=torch.float32, drop_path=0.5).train()
    check_same_seed_as_reference(block, random_input((8, 12, 3, 4), dtype=torch.float32),
                                 'triton', tol=1e-5)


def test_training_forward_saves_only_x_and_per_channel_statistics():
    block = make_block(16, dtype=torch.float32).train()
    x = random_input((2, 16, 6, 6), dtype=torch.float32).requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), rk.use_backend('triton'):
        block(x)
    n, c, t = 2, 16, 36
    big = [s for s in saved if s.numel() > n * c]
    # besides x itself only parameters (at most 4C*C) may be larger than N*C
    for s in big:
        assert s.data_ptr() == x.data_ptr() or s.numel() <= 4 * c * c, tuple(s.shape)
    assert sum(s.data_ptr() == x.data_ptr() for s in big) >= 1
    assert not any(s.numel() >= n * c * t and s.data_ptr() != x.data_ptr() for s in saved)


def test_custom_ops_pass_opcheck():
    x = random_input((2, 16, 3, 5), dtype=torch.float32)
    torch.library.opcheck(tfw.moments_partials, (x,))
    block = make_block(16, dtype=torch.float32)
    p = BlockParams.of(block)
    nc = torch.rand(2, 16).to(DEV) + 0.5
    args = (x, nc, nc - 1, nc + 1, nc * 0.1, nc * 2, p.w1.detach(), p.b1.detach(),
            p.w2.detach(), p.b2.detach())
    torch.library.opcheck(tfw.fused_mlp_forward, args,
                          test_utils=('test_schema', 'test_faketensor'))


@pytest.mark.skipif(not INTERPRETER, reason="CPU tensors run the triton kernels only under "
                    "the interpreter (the GPU counterpart: test_dispatch_rules_for_cuda_tensors)")
def test_dispatch_rules_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv('RIFORMER_BACKEND', raising=False)
    block = helpers.make_block(8, dtype=torch.float32)
    x = helpers.random_input((1, 8, 2, 2), dtype=torch.float32)
    assert 'triton' not in dispatch.AUTO_ORDER['cpu']
    assert dispatch.choose_backend(block, x).backend.name != 'triton'
    with rk.use_backend('triton'):
        assert dispatch.choose_backend(block, x).backend.name == 'triton'
        with pytest.raises(rk.BackendUnavailableError, match='float32/float16/bfloat16'):
            block.double()(x.double())
    monkeypatch.setattr(tfw, 'INTERPRET', False)
    assert 'TRITON_INTERPRET' in (tbk._supports(block, x) or '')


@pytest.mark.gpu
def test_dispatch_rules_for_cuda_tensors(monkeypatch):
    """On a GPU auto picks the triton kernels for CUDA tensors, and explicit requests for a
    dtype they do not take fail with the reason."""
    monkeypatch.delenv('RIFORMER_BACKEND', raising=False)
    block = make_block(8, dtype=torch.float32)
    x = random_input((1, 8, 2, 2), dtype=torch.float32)
    assert x.is_cuda and not tfw.INTERPRET
    assert dispatch.AUTO_ORDER['cuda'][0] == 'triton'
    assert dispatch.choose_backend(block, x).backend.name == 'triton'
    with rk.use_backend('triton'), pytest.raises(rk.BackendUnavailableError,
                                                  match='float32/float16/bfloat16'):
        block.double()(x.double())
    assert 'CPU tensors' in (tbk._supports(block, x.cpu()) or '')


# ---------------------------------------------------------------------------------------------
# the two-GEMM path and the rule that picks it

def _force_two_gemm(monkeypatch):
    """Make the rule pick the two-GEMM path for every shape; returns the GEMM-2 launch log."""
    monkeypatch.setattr(tfw, 'mlp_path', lambda c, dtype: 'two_gemm')
    return _count_launches(monkeypatch, '_launch_gemm2')


def _count_launches(monkeypatch, name):
    launches = []
    real = getattr(tfw, name)

    def counted(*args, **kwargs):
        launches.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tfw, name, counted)
    return launches


# (C, shape, channels_last, forced): C=48 forced onto the two-GEMM path (fp32 takes it by the
# rule too; in half it is a flash shape, and 48 = 1.5 x 32 gives a masked K chunk in GEMM 2);
# 320 and 768 take it by the rule. Token tiles are 64 (GEMM 1, fp32) / 64 (GEMM 2, fp32):
# H*W = 35, 21, 6 are all partial tiles.
# (C=768 by the rule: FP32_CASES.)
TWO_GEMM_FP32 = [(48, (2, 48, 5, 7), False, True), (48, (1, 48, 3, 7), True, True),
                 (320, (2, 320, 3, 7), True, False)]


@pytest.mark.parametrize('c,shape,channels_last,forced', TWO_GEMM_FP32)
def test_two_gemm_fp32_within_1e5_of_fp64_reference(c, shape, channels_last, forced,
                                                     monkeypatch, nan_poisoned_outputs):
    if forced:
        launches = _force_two_gemm(monkeypatch)
    else:
        assert tfw.mlp_path(c, torch.float32) == 'two_gemm'
        launches = _count_launches(monkeypatch, '_launch_gemm2')
    block = make_block(c, dtype=torch.float32).eval()
    x = random_input(shape, dtype=torch.float32, channels_last=channels_last)
    out = run_block(block, x, 'triton')[0]
    assert launches == [1]
    err = rel_err(out, _truth(block, x))
    assert err <= 1e-5, err
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize('dtype,c,shape,channels_last', [
    (torch.bfloat16, 48, (2, 48, 5, 7), False), (torch.float16, 48, (1, 48, 3, 5), True),
    (torch.bfloat16, 320, (1, 320, 1, 3), True)])
def test_two_gemm_half_dtypes_within_twice_reference_error(dtype, c, shape, channels_last,
                                                           monkeypatch):
    if tfw.mlp_path(c, dtype) == 'flash':
        launches = _force_two_gemm(monkeypatch)
    else:
        launches = _count_launches(monkeypatch, '_launch_gemm2')
    block = make_block(c, dtype=dtype).eval()
    x = random_input(shape, dtype=dtype, channels_last=channels_last)
    truth = _truth(block, x)
    ref_err = rel_err(run_block(block, x, 'reference')[0], truth)
    err = rel_err(run_block(block, x, 'triton')[0], truth)
    assert launches == [1]
    assert ref_err > 0
    assert err <= 2 * ref_err, (err, ref_err)


def test_two_gemm_chained_statistics_equal_unchained(monkeypatch):
    """Chaining across two-GEMM blocks, with several token tiles per program (SUBTILES > 1),
    several partials per sample and a ragged last tile, at a C that is no multiple of 16."""
    launches = _force_two_gemm(monkeypatch)
    moments = _count_moments_launches(monkeypatch)
    monkeypatch.setattr(tfw, 'TARGET_PROGRAMS', 1)
    n, c, h, w = 1, 40, 23, 29                     # T = 667 > the 512-token span
    cfg = tfw.mlp_config(n, c, h * w, torch.float32)
    assert cfg['path'] == 'two_gemm' and cfg['SUBTILES'] > 1 and cfg['n_parts'] > 1
    seq = torch.nn.Sequential(*[make_block(c, dtype=torch.float32) for _ in range(2)]).eval()
    x = random_input((n, c, h, w), dtype=torch.float32)
    with torch.no_grad(), rk.use_backend('triton'):
        chained = seq(x)
        assert len(moments) == 1 and len(launches) == 2
        unchained = seq[1](seq[0](x).clone())
        assert len(moments) == 3
    assert rel_err(chained, unchained) <= 1e-6
    with torch.no_grad(), rk.use_backend('reference'):
        truth = copy.deepcopy(seq).double()(x.double())
    assert rel_err(chained, truth) <= 1e-5


def _op_args(c, shape, dtype, channels_last=False):
    block = make_block(c, dtype=dtype)
    p = BlockParams.of(block)
    x = random_input(shape, dtype=dtype, channels_last=channels_last)
    nc = torch.rand(shape[0], c).to(DEV) + 0.5
    return (x, nc, nc - 1, nc + 1, nc * 0.1, nc * 2, p.w1.detach(), p.b1.detach(),
            p.w2.detach(), p.b2.detach())


@pytest.mark.parametrize('path,c', [('flash', 16), ('two_gemm', 24)])
def test_save_u_returns_the_pre_gelu_hidden_and_leaves_out_unchanged(path, c):
    args = _op_args(c, (2, c, 3, 5), torch.float32, channels_last=True)
    x, A, B, w1, b1 = args[0], args[1], args[2], args[6], args[7]
    out, pmean, pm2, u = tfw.mlp_forward(*args, save_u=True, path=path)
    out0, pmean0, pm20, u0 = tfw.mlp_forward(*args, save_u=False, path=path)
    assert u0.numel() == 0
    # SAVE_U=True and SAVE_U=False are two compilations of the same fp32 arithmetic. numpy (the
    # interpreter) evaluates both identically: bitwise equal there. A GPU compiler may contract
    # a*b+c into an FMA differently in the two variants (each choice one rounding, 2^-24 of the
    # operands); 1e-6 of the tensor's scale leaves room for the dots' few hundred terms and the
    # moments' span-long sums while catching any real difference (u written over out, a wrong
    # tile: order-one errors).
    for a, b in ((out, out0), (pmean, pmean0), (pm2, pm20)):
        assert torch.equal(a, b) if INTERPRETER else rel_err(a, b) <= 1e-6
    z = A.double()[:, :, None, None] * x.double() + B.double()[:, :, None, None]
    u_ref = F.conv2d(z, w1.double(), b1.double())
    assert u.shape == u_ref.shape and u.dtype == x.dtype
    assert u.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(u, u_ref) <= 1e-6


def test_gemm_ops_compose_to_the_two_gemm_forward():
    args = _op_args(40, (2, 40, 3, 3), torch.float16)
    x, A, B, a, b, l2, w1, b1, w2, b2 = args
    h, u = tfw.mlp_hidden(x, A, B, w1, b1, save_u=True)
    out, pmean, pm2 = tfw.mlp_output(h, x, a, b, l2, w2, b2)
    ref = tfw.mlp_forward(*args, save_u=True, path='two_gemm')
    # bitwise on every device: the same two compiled kernels (GEMM 1 with SAVE_U, GEMM 2) with
    # the same inputs, a run-to-run comparison within one variant
    assert torch.equal(out, ref[0]) and torch.equal(pmean, ref[1]) and torch.equal(u, ref[3])
    # h = GELU(u) rounded once to fp16 from the fp32 u; u itself is stored rounded
    assert rel_err(h, F.gelu(u.float())) <= 2e-3


def test_new_custom_ops_pass_opcheck():
    args = _op_args(16, (2, 16, 3, 5), torch.float32)
    x, A, B, a, b, l2, w1, b1, w2, b2 = args
    utils = ('test_schema', 'test_faketensor')
    for path in ('flash', 'two_gemm'):
        torch.library.opcheck(tfw.mlp_forward, args, dict(save_u=True, path=path),
                              test_utils=utils)
    torch.library.opcheck(tfw.mlp_forward, args, test_utils=utils)
    torch.library.opcheck(tfw.mlp_hidden, (x, A, B, w1, b1), dict(save_u=True), test_utils=utils)
    h, _ = tfw.mlp_hidden(x, A, B, w1, b1)
    torch.library.opcheck(tfw.mlp_output, (h, x, a, b, l2, w2, b2), test_utils=utils)


@pytest.mark.parametrize('c,dtype,path', [
    (320, torch.float32, 'two_gemm'), (128, torch.float32, 'two_gemm'),
    (512, torch.float32, 'two_gemm'), (768, torch.float16, 'two_gemm'),
    (768, torch.bfloat16, 'two_gemm'), (2048, torch.float16, 'two_gemm'),
    (64, torch.float32, 'flash'), (128, torch.float32, 'two_gemm'),
    (256, torch.float16, 'two_gemm'),
    (64, torch.float16, 'flash'), (128, torch.bfloat16, 'flash'), (16, torch.float32, 'flash'),
    (32, torch.float32, 'flash'), (96, torch.float16, 'flash'), (192, torch.bfloat16, 'two_gemm'),
    (16, torch.bfloat16, 'flash')])
def test_rule_picks_the_expected_path(c, dtype, path):
    assert tfw.mlp_path(c, dtype) == path
    assert tfw.mlp_config(2, c, 49, dtype)['path'] == path


def _spec_key(fn_name, const, warps):
    keep = ('BLOCK_T', 'BLOCK_C', 'BLOCK_H', 'BLOCK_K', 'DOT_FP32', 'INPUT_PRECISION',
            'SAVE_U', 'stride_xt', 'stride_xc')
    return (fn_name, warps) + tuple(sorted((k, v) for k, v in const.items() if k in keep))


def test_rule_never_picks_a_config_missing_from_gpu_build_specs():
    """Every (C, dtype) -> config the rule gives, in both layouts and with/without u, is compiled
    (and thereby checked spill-free) by gpu_build_report."""
    built = {_spec_key(fn.__name__, const, opts[0]['num_warps'])
             for fn, sig, const, desc, *opts in tfw.GPU_BUILD_SPECS}
    for dtype in tfw.SUPPORTED_DTYPES:
        gpu_default = dict(DOT_FP32=dtype == torch.float32,
                           INPUT_PRECISION='ieee' if dtype == torch.float32 else 'tf32')
        for c in list(range(1, 130)) + [192, 255, 256, 257, 320, 384, 511, 512, 513, 768, 1024,
                                        1536]:
            cfg = tfw.mlp_config(4, c, 3136, dtype)
            assert cfg['spill_free']
            for unit in ('stride_xt', 'stride_xc'):
                for save_u in (False, True):
                    if cfg['path'] == 'flash':
                        # a tile may name its fp32 dot precision (3xTF32); the launch uses it
                        gpu = dict(gpu_default, INPUT_PRECISION=cfg['fp32_precision']) \
                            if dtype == torch.float32 else gpu_default
                        want = [_spec_key('fused_mlp_kernel', dict(
                            BLOCK_T=cfg['BLOCK_T'], BLOCK_C=cfg['BLOCK_C'],
                            BLOCK_H=cfg['BLOCK_H'], SAVE_U=save_u, **{unit: 1}, **gpu),
                            cfg['num_warps'])]
                    else:
                        gpu = gpu_default
                        g1, g2 = cfg['gemm1'], cfg['gemm2']
                        want = [_spec_key('mlp_gemm1_kernel', dict(
                            BLOCK_T=g1['BLOCK_T'], BLOCK_H=g1['BLOCK_H'],
                            BLOCK_K=g1['BLOCK_K'], SAVE_U=save_u, **{unit: 1}, **gpu),
                            g1['num_warps']),
                            _spec_key('mlp_gemm2_kernel', dict(
                                BLOCK_T=g2['BLOCK_T'], BLOCK_C=g2['BLOCK_C'],
                                BLOCK_K=g2['BLOCK_K'], **{unit: 1}, **gpu), g2['num_warps'])]
                    for key in want:
                        assert key in built, (c, dtype, key)


# ---------------------------------------------------------------------------------------------
# the kernel-test device, and what only compiled kernels on a GPU can show

def test_this_module_builds_on_the_kernel_device():
    """The module's blocks and inputs are on KERNEL_DEVICE, which is CUDA whenever torch sees
    a GPU (unless RIFORMER_TEST_DEVICE says otherwise): no test here can silently run CPU
    tensors on a GPU machine."""
    x, block = random_input((1, 4, 2, 2)), make_block(4)
    assert x.device.type == block.mlp.fc1.weight.device.type == DEV.type
    if torch.cuda.is_available() and not os.environ.get('RIFORMER_TEST_DEVICE'):
        assert DEV.type == 'cuda'
    assert tfw.INTERPRET == INTERPRETER


def _stage_case_id(case):
    c, hw, n = case
    return f'N{n}-C{c}-{hw}x{hw}'


# S12's four stages at N=64 (docs/design.md): C=64 at 56x56, 128 at 28x28, 320 at 14x14, 512 at
# 7x7. The fp32 C=64 stage is a flash shape (IEEE fp32 dots); 128 and up take the two-GEMM path.
S12_STAGES = [(64, 56, 64), (128, 28, 64), (320, 14, 64), (512, 7, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize('c', [33, 48, 64])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_gpu_fp32_flash_tiles_within_1e5(c, channels_last):
    """fp32 C in 33..64 runs the flash tile with the dot precision MLP_TILES names for it (IEEE
    since the tiles were chosen on the launched variants; 3xTF32 before). The interpreter
    ignores input_precision (its dots are numpy fp32), so only compiled kernels test that the
    precision keeps the 1e-5 fp32 contract; 8 x 56 x 56 tokens, many tiles."""
    shape = (8, c, 56, 56)
    cfg = tfw.mlp_config(shape[0], c, shape[2] * shape[3], torch.float32)
    assert cfg['path'] == 'flash' and cfg['fp32_precision'] in ('ieee', 'tf32x3'), cfg
    block = make_block(c, dtype=torch.float32).eval()
    x = random_input(shape, dtype=torch.float32, channels_last=channels_last)
    assert x.is_cuda and not tfw.INTERPRET
    err = rel_err(run_block(block, x, 'triton')[0], _truth(block, x))
    assert err <= 1e-5, err


@pytest.mark.gpu
@pytest.mark.parametrize('stage', S12_STAGES, ids=_stage_case_id)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_gpu_s12_stage_forward(stage, dtype, channels_last):
    """The forward at S12's real stage shapes, N=64: fp32 within 1e-5 of the fp64 reference,
    bf16 within twice the reference's own bf16 error (too large for the interpreter)."""
    c, hw, n = stage
    block = make_block(c, dtype=dtype).eval()
    x = random_input((n, c, hw, hw), dtype=dtype, channels_last=channels_last)
    assert x.is_cuda and not tfw.INTERPRET
    truth = _truth(block, x)
    out = run_block(block, x, 'triton')[0]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    err = rel_err(out, truth)
    if dtype == torch.float32:
        assert err <= 1e-5, err
    else:
        ref_err = rel_err(run_block(block, x, 'reference')[0], truth)
        assert 0 < ref_err and err <= 2 * ref_err, (err, ref_err)
