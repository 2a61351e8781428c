"""`python -m riformer_kernels.tools.gpu_build_report`: real-GPU compiles of the Triton kernels, no GPU."""
import subprocess
import sys

import pytest
import torch

from riformer_kernels.backends.triton import forward as tfw
from riformer_kernels.tools import gpu_build_report as report

pytest.importorskip('triton')

_ALIGNED = [['tt.divisibility', 16]]


def test_forward_specs_are_discovered_and_well_formed():
    specs = report.collect_specs()
    mine = [s for m, s in specs if m == 'riformer_kernels.backends.triton.forward']
    names = {s[0].__name__ for s in mine}
    assert {'fused_mlp_kernel', 'moments_kernel'} <= names
    for fn, sig, const, desc, *opts in mine:
        assert set(sig) | set(const) == set(fn.arg_names), desc
        assert isinstance(desc, str) and desc
        assert not opts or 'num_warps' in opts[0]


@pytest.fixture(scope='module')
def s12_stages():
    """Launched variants of S12 stage 1 (56x56) and stage 3 (14x14), N=8, fp16: pure, no compile."""
    shapes = {(64, 56, 56): ['s12@224 stage 1'], (320, 14, 14): ['s12@224 stage 3']}
    return report.launched_variants(shapes, batches=(8,), dtypes=(torch.float16,))


def _flash(variants, layout, save_u=False):
    return [v for v in variants if v['name'] == 'fused_mlp_kernel'
            and f"fp16 {layout} " in v['desc'] and v['constexprs']['SAVE_U'] == save_u]


def test_launched_variants_have_triton_divisibility_and_unit_stride_specialisation(s12_stages):
    """The enumeration records the real launches and applies Triton's own binder: aligned
    pointers and integers % 16 == 0 get tt.divisibility 16, integers equal to 1 become
    constants, and NCHW and channels_last differ in which stride is the constant 1."""
    (nchw,), (cl,) = _flash(s12_stages, 'nchw'), _flash(s12_stages, 'cl')
    for v in (nchw, cl):
        for ptr in ('x_ptr', 'out_ptr', 'w1_ptr', 'w2_ptr', 'A_ptr', 'pmean_ptr'):
            assert v['attrs'][ptr] == _ALIGNED, (v['desc'], ptr)
        assert v['attrs']['T'] == _ALIGNED and v['attrs']['C'] == _ALIGNED   # 3136, 64
        assert v['constexprs']['stride_w1c'] == 1 and v['constexprs']['stride_w2h'] == 1
        cfg = tfw.mlp_config(8, 64, 3136, torch.float16)
        assert (v['constexprs']['BLOCK_T'], v['constexprs']['BLOCK_H'],
                v['options']['num_warps']) == (cfg['BLOCK_T'], cfg['BLOCK_H'], cfg['num_warps'])
    assert nchw['constexprs']['stride_xt'] == 1 and nchw['constexprs']['stride_ot'] == 1
    assert nchw['signature']['stride_xc'] == 'i32' and nchw['attrs']['stride_xc'] == _ALIGNED
    assert cl['constexprs']['stride_xc'] == 1 and cl['constexprs']['stride_oc'] == 1
    assert cl['signature']['stride_xt'] == 'i32'
    assert any('s12@224 stage 1 N=8 fp16 nchw' in s for s in nchw['shapes'])


def test_unaligned_token_counts_stay_runtime_values(s12_stages):
    """14x14 = 196 tokens is not a multiple of 16: T (and the NCHW channel stride 196) carry no
    divisibility attribute, so those variants are compiled as the unaligned kernels they are."""
    g1 = [v for v in s12_stages if v['name'] == 'mlp_gemm1_kernel']
    assert g1 and all('T' not in v['attrs'] for v in g1)
    nchw = [v for v in g1 if v['constexprs'].get('stride_xt') == 1]
    assert nchw and all('stride_xc' not in v['attrs'] for v in nchw)
    assert all(v['attrs']['x_ptr'] == _ALIGNED for v in g1)


def test_pointer_alignment_follows_the_view_offset():
    x = torch.empty(64, dtype=torch.float16, device='meta')
    assert report._Pointer(x).data_ptr() % 16 == 0
    assert report._Pointer(x[8:]).data_ptr() % 16 == 0
    assert report._Pointer(x[3:]).data_ptr() % 16 == 6


def test_training_step_paths_are_all_enumerated(s12_stages):
    """Forward flash (C=64) and two-GEMM (C=320), backward small path (dx kernel) and large path
    (hidden / dz-chunk / scratch weight-gradient kernels), with and without u, both layouts."""
    names = {v['name'] for v in s12_stages}
    assert {'moments_kernel', 'fused_mlp_kernel', 'mlp_gemm1_kernel', 'mlp_gemm2_kernel',
            '_mlp_dx_kernel', '_mlp_weight_grad_kernel', '_mlp_hidden_kernel',
            '_mlp_dz_chunk_kernel'} <= names
    assert _flash(s12_stages, 'nchw', True) and _flash(s12_stages, 'cl', True)
    hidden = [v for v in s12_stages if v['name'] == '_mlp_hidden_kernel']
    assert {v['constexprs']['HAS_U'] for v in hidden} == {False, True}
    keys = [(v['name'], v['desc'], str(sorted(v['attrs'].items()))) for v in s12_stages]
    assert len(set(keys)) == len(keys)


def test_half_mma_tiles_give_every_warp_its_own_16x16_tiles():
    """No launched fp16/bf16 forward MMA kernel has more warps than 16x16 tiles in a dot."""
    variants = report.launched_variants(
        {(c, 28, 28): ['x'] for c in (16, 32, 64, 128, 320)}, batches=(8,),
        dtypes=(torch.bfloat16,), layouts=('cl',))
    fwd = [v for v in variants if v['name'] in ('fused_mlp_kernel', 'mlp_gemm1_kernel',
                                               'mlp_gemm2_kernel')]
    assert fwd
    for v in fwd:
        assert v['options']['num_warps'] <= v['warp_tiles'], v['desc']


def test_report_compiles_a_launched_subset_for_sm80_and_sm90_without_spills():
    """A few launched variants (the full report compiles ~500 variants x 2 archs)."""
    only = ['fused_mlp_kernel bf16 cl T32 C64 H64 w8s3 [n_parts,subtiles]',
            'moments_kernel fp16 cl C32 T128 w4s3 =1:n_parts []']
    res = subprocess.run([sys.executable, '-m', 'riformer_kernels.tools.gpu_build_report',
                          '--skip-cuda', '--only', *only], capture_output=True, text=True,
                         timeout=900)
    print(res.stdout[-3000:], res.stderr[-3000:])
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(('fused_mlp', 'moments'))]
    assert lines and len(lines) % 2 == 0
    assert {ln.split()[0] for ln in lines} == {'fused_mlp_kernel', 'moments_kernel'}
    assert sum('sm_80' in ln for ln in lines) == sum('sm_90' in ln for ln in lines)
    assert ' 0 failed' in res.stdout


def test_ptx_load_counts():
    ptx = """
    ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    @%p1 ld.global.b16 { %rs1 }, [ %rd2 + 0 ];
    @!%p2 ld.global.v2.b32 { %r5, %r6 }, [ %rd3 + 0 ];
    cp.async.cg.shared.global [ %r7 + 0 ], [ %rd4 + 0 ], 0x10, %r8;
    ld.shared.b32 %r9, [%r10];
    """
    assert report.ptx_global_loads(ptx) == dict(ld_vector=2, ld_scalar=1, cp_async=1, tma=0)


def test_spills_and_compile_errors_make_the_exit_status_nonzero(monkeypatch, capsys):
    ok = dict(kernel='k', config='c', arch='sm_90', registers=40, spill_stores=0,
              spill_loads=0, stack=0, smem=0)
    monkeypatch.setattr(report, 'run_triton_report', lambda *a, **k: [ok])
    assert report.main(['--skip-cuda']) == 0
    spill = dict(ok, spill_stores=8)
    monkeypatch.setattr(report, 'run_triton_report', lambda *a, **k: [ok, spill])
    assert report.main(['--skip-cuda']) == 1
    stack = dict(ok, stack=16)
    monkeypatch.setattr(report, 'run_triton_report', lambda *a, **k: [ok, stack])
    assert report.main(['--skip-cuda']) == 1
    broken = dict(kernel='k', config='c', arch='sm_80', error='CompilationError: boom')
    monkeypatch.setattr(report, 'run_triton_report', lambda *a, **k: [broken])
    assert report.main(['--skip-cuda']) == 1
    assert 'COMPILE ERROR' in capsys.readouterr().out


def test_cuda_rows_join_the_table(monkeypatch, capsys):
    cuda_row = dict(kernel='moments_cuda', arch='sm_80', registers=32, spill_stores=0,
                    spill_loads=0, stack=0, smem=1024)
    monkeypatch.setattr(report, 'run_triton_report', lambda *a, **k: [])
    monkeypatch.setattr(report, 'run_cuda_report', lambda archs: [dict(cuda_row, config='cuda')])
    assert report.main([]) == 0
    assert 'moments_cuda' in capsys.readouterr().out
