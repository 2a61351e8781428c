"""The fused model trains under torch.distributed: DistributedDataParallel and FSDP2
(`torch.distributed.fsdp.fully_shard`) on 2 CPU processes (gloo, loopback) give the gradients a
single process computes on the concatenated batch.

GroupNorm's statistics are per sample, so splitting the batch changes nothing in exact
arithmetic: with a mean loss per rank, the average over the ranks is the mean over the whole
batch. What differs is the order of the fp32 sums (each rank reduces its half of the batch in
the weight gradients, then the ranks' results are averaged), so the bound is the fp32 block
contract, 1e-5 of each gradient's scale -- about 100 fp32 ulps, far below what a wrong
reduction (a missing average: 2x; a dropped rank: O(1)) would give.
"""
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import riformer_kernels as rk
from riformer_kernels.testing import randomize_, rel_err

CPU = rk.available_backends()['cpu']
pytestmark = [
    pytest.mark.skipif(not CPU.usable, reason=f"cpu backend unusable: {CPU.reason}"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with gloo is not available in this build"),
]

WORLD = 2
ARCH = {'layers': [2, 1, 1, 1], 'embed_dims': [8, 12, 16, 24], 'mlp_ratios': [4, 4, 4, 4],
        'layer_scale_init_value': 1e-5}
TOL = 1e-5


def _model():
    torch.manual_seed(0)
    # randomize_: layer scales of order one, so every branch's gradient is visible
    return randomize_(rk.RIFormerClassifier(ARCH, num_classes=5, in_patch_size=3, in_stride=2,
                                            in_pad=1))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2 * WORLD, 3, 16, 16, generator=g), torch.randint(0, 5, (2 * WORLD,),
                                                                          generator=g)


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def _single_process_grads():
    model = _model()
    x, y = _batch()
    _loss(model, x, y).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _compare(got: dict, want: dict, what: str):
    assert got.keys() == want.keys(), what
    bad = {n: rel_err(got[n], want[n]) for n in want if not rel_err(got[n], want[n]) <= TOL}
    assert not bad, f"{what}: gradients above {TOL}: {bad}"


def _worker(rank, port, result_dir):
    try:
        torch.set_num_threads(1)
        dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                                world_size=WORLD)
        rk.use_backend('cpu')                  # every block on the fused kernels, by name
        want = _single_process_grads()
        x, y = _batch()
        shard = slice(rank * 2, rank * 2 + 2)  # this rank's half of the batch

        ddp = torch.nn.parallel.DistributedDataParallel(_model())
        _loss(ddp, x[shard], y[shard]).backward()
        _compare({n.removeprefix('module.'): p.grad for n, p in ddp.named_parameters()}, want,
                 'DDP')

        from torch.distributed.fsdp import fully_shard
        model = _model()
        for stage in model.backbone.network[::2]:
            for block in stage:
                fully_shard(block)             # one FSDP unit per fused block
        fully_shard(model)
        _loss(model, x[shard], y[shard]).backward()
        # sharded DTensor gradients; full_tensor() gathers each one
        _compare({n: p.grad.full_tensor() for n, p in model.named_parameters()}, want, 'FSDP2')
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(result_dir, f'rank{rank}.err'), 'w') as f:
            f.write(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_ddp_and_fsdp2_gradients_equal_single_process_on_the_whole_batch(tmp_path):
    # The single-process run must itself differ from the half-batch gradient, or the
    # comparison could not tell a missing all-reduce from a correct one.
    model = _model()
    x, y = _batch()
    _loss(model, x[:2], y[:2]).backward()
    half = {n: p.grad for n, p in model.named_parameters()}
    whole = _single_process_grads()
    assert max(rel_err(half[n], whole[n]) for n in whole) > 100 * TOL
    try:
        mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD,
                           join=True, start_method='spawn')
    except mp.ProcessRaisedException:
        errors = [p.read_text() for p in sorted(tmp_path.glob('rank*.err'))]
        pytest.fail('\n'.join(errors) or 'a worker failed')


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'python', 'train_distill.py')


def _script_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location('train_distill', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_rank_gets_a_disjoint_part_of_every_global_batch():
    from riformer_kernels import distill
    script = _script_module()
    images, labels = torch.arange(11.).reshape(11, 1, 1, 1), torch.arange(11)
    batches = distill.TensorBatches(images, labels, batch_size=4, seed=3)   # 4, 4, 3
    for world, expected_len in ((2, 3), (4, 2)):       # a last batch of 3 is skipped at 4 ranks
        parts = [list(script.ShardedBatches(batches, r, world).epoch(1)) for r in range(world)]
        assert all(len(p) == expected_len == len(script.ShardedBatches(batches, 0, world))
                   for p in parts)
        for step, (x, y) in enumerate(list(batches.epoch(1))[:expected_len]):
            got = torch.cat([parts[r][step][1] for r in range(world)])
            assert sorted(got.tolist()) == sorted(y.tolist())          # disjoint, complete
            assert all(torch.equal(parts[r][step][0].flatten(), parts[r][step][1].float())
                       for r in range(world))                          # images follow labels


def test_train_distill_runs_under_torchrun_and_only_rank_0_writes(tmp_path):
    pytest.importorskip('sklearn', reason='train_distill needs scikit-learn (the distill extra)')
    import json
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
         str(WORLD), SCRIPT, '--quick', '--no-progress', '--threads', '1', '--out',
         str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['command'].startswith(f'torchrun --standalone --nproc_per_node {WORLD} ')
    assert [r['world_size'] for r in results['results']] == [WORLD] * 4
    assert (tmp_path / 'results.md').read_text().count('| (a)') == 1   # written once
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*') if p.is_file())
    expected = {'results.json', 'results.md', 'curves.png'} | {
        f'checkpoints/{run}/{f}' for run in ('teacher', 'a_labels', 'b_soft_kd',
                                             'c_kd_imitation') for f in ('last.pt', 'result.json')}
    assert set(files) <= expected and set(files) >= expected - {'curves.png'}, files
