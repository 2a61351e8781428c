"""Distil a PoolFormer teacher into a RIFormer student on scikit-learn's digits (8x8, upscaled to
32x32), as in RIFormer's recipe (docs/distillation.md), and compare three students:

    (a) labels only (cross-entropy), trained from scratch
    (b) soft-label distillation only (no labels), from scratch
    (c) soft-label distillation + module imitation (L_in, L_out, L_rel), initialised from the
        teacher

Every student is switched to deploy form (no token mixer) before its test accuracy is taken.
The output folder gets results.md (table, machine, command), results.json, curves.png (loss and
test accuracy per epoch) and the checkpoints. The data ship inside scikit-learn: nothing is
downloaded.

    python python/train_distill.py --out docs/results/distill      # a few minutes on CPU
    python python/train_distill.py --quick --out /tmp/distill       # seconds (CI)
    torchrun --standalone --nproc_per_node 2 python/train_distill.py --quick --out /tmp/distill

Under torchrun (one node) every run trains with DistributedDataParallel on the gloo backend:
each global batch of --batch-size images is split between the ranks (rank r takes every
world-th image from r), the ranks' gradients are averaged, and only rank 0 writes checkpoints,
results and plots (the other ranks read the teacher checkpoint rank 0 wrote, after a barrier).
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import riformer_kernels as rk
from riformer_kernels.atomic import replacing
from riformer_kernels import distill as D

ARCH = dict(layers=[1, 1, 2, 1], embed_dims=[16, 32, 64, 96])
QUICK_ARCH = dict(layers=[1, 1, 1, 1], embed_dims=[8, 12, 16, 24])
# 32x32 input: a 3x3 stride-2 stem gives 16x16 tokens, then 8, 4, 2 per stage (the default
# 7x7 stride-4 stem would leave the last stage 1x1, where pooling is the identity).
STEM = dict(in_channels=1, in_patch_size=3, in_stride=2, in_pad=1)


class Distributed:
    """This process's place in a torchrun job: rank and world size from torchrun's environment
    (RANK, WORLD_SIZE, LOCAL_RANK); rank 0 of a world of 1 without torchrun."""
    rank = 0
    world = 1
    local_rank = 0

    @classmethod
    def init_from_env(cls) -> None:
        cls.world = int(os.environ.get('WORLD_SIZE', '1'))
        if cls.world <= 1:
            return
        cls.rank = int(os.environ['RANK'])
        cls.local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        # CPU training: gloo (the fused cpu kernels run on CPU tensors). torchrun sets
        # MASTER_ADDR/MASTER_PORT, which the env:// rendezvous reads.
        dist.init_process_group('gloo', init_method='env://', rank=cls.rank,
                                world_size=cls.world)

    @classmethod
    def is_main(cls) -> bool:
        return cls.rank == 0

    @classmethod
    def barrier(cls) -> None:
        if cls.world > 1:
            dist.barrier()


class ShardedBatches:
    """This rank's part of every global batch of `batches` (rank r: images r, r + world, ...).
    Every rank sees the same shuffle and augmentation (seeded per epoch), so the parts are
    disjoint and together are the global batch. A global batch smaller than the world (a short
    last batch) is skipped on every rank: a rank with no images would have no loss to average."""

    def __init__(self, batches: D.TensorBatches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        n, bs = self.batches.images.shape[0], self.batches.batch_size
        return n // bs + (1 if n % bs >= self.world else 0)

    def epoch(self, epoch: int):
        for x, y in self.batches.epoch(epoch):
            if x.shape[0] >= self.world:
                yield x[self.rank::self.world], y[self.rank::self.world]


class DataParallel(DistributedDataParallel):
    """DDP whose state_dict is the wrapped model's (a checkpoint loads into the plain model)
    and whose other attributes (backbone, switch_to_deploy, ...) are the model's, so the
    Trainer and the capture helpers see the model they expect."""

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def load_digits(seed: int, quick: bool, train_size: int | None = None):
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as err:
        raise SystemExit("train_distill needs scikit-learn (pip install 'riformer_kernels"
                         "[distill]'): its digits data set ships inside the package") from err
    data = sk_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    images = F.interpolate(images, size=(32, 32), mode='bilinear', align_corners=False)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(images.shape[0], generator=g)
    n_test = 360
    test, train = order[:n_test], order[n_test:]
    if quick:
        test, train = test[:96], train[:192]
    if train_size is not None:
        if not 10 <= train_size <= train.numel():
            raise SystemExit(f"--train-size must be between 10 and {train.numel()}")
        train = train[:train_size]
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return images[train], labels[train], images[test], labels[test]


def random_shift(max_shift: int):
    """Augmentation: each image moved by up to `max_shift` pixels in x and y (zero fill)."""
    def transform(x, g):
        n, _, h, w = x.shape
        padded = F.pad(x, [max_shift] * 4)
        dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g).tolist()
        dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g).tolist()
        return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    return transform


def rss_mib() -> float:
    """Resident memory of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20
    except OSError:
        return 0.0


def peak_rss_mib() -> float:
    """This process's resident-memory high-water mark (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_atomically(path: str, text: str) -> None:
    with replacing(path) as tmp, open(tmp, 'w') as f:
        f.write(text)


def train_run(name, model, loss_cfg, args, data, teacher=None):
    x_tr, y_tr, x_te, y_te = data
    batches = D.TensorBatches(x_tr, y_tr, args.batch_size, seed=args.seed,
                              transform=random_shift(2))
    # Only rank 0 writes checkpoints (resuming under torchrun is refused in main).
    ck_dir = os.path.join(args.out, 'checkpoints', name) if Distributed.is_main() else None
    if Distributed.world > 1:
        batches = ShardedBatches(batches, Distributed.rank, Distributed.world)
        model = DataParallel(model)
    cfg = D.TrainConfig(epochs=args.teacher_epochs if name == 'teacher' else args.epochs,
                        lr=args.lr, weight_decay=0.05, warmup_epochs=args.warmup_epochs,
                        accumulation=args.accumulation, checkpoint_dir=ck_dir,
                        progress_bar=not args.no_progress and Distributed.is_main(), desc=name)
    trainer = D.Trainer(model, cfg, D.DistillationLoss(loss_cfg), teacher=teacher,
                        evaluate=lambda m: dict(test_acc=D.accuracy(m, x_te, y_te)))
    before = rss_mib()
    history = trainer.fit(batches)
    ep = history['epochs']
    result = dict(name=name, epochs=len(ep), test_acc_train_form=D.accuracy(model, x_te, y_te),
                  seconds_per_epoch=sum(e['seconds'] for e in ep) / len(ep),
                  peak_rss_mib=peak_rss_mib(), rss_before_training_mib=before, history=ep)
    print(f"{name}: test accuracy {result['test_acc_train_form']:.4f}, "
          f"{result['seconds_per_epoch']:.2f} s/epoch", file=sys.stderr)
    return result


RUNS = [  # name, label, loss, initialised from the teacher
    ('teacher', 'teacher: PoolFormer, labels', 'labels', False),
    ('a_labels', '(a) RIFormer, labels only', 'labels', False),
    ('b_soft_kd', '(b) RIFormer, soft KD', 'soft', False),
    ('c_kd_imitation', '(c) RIFormer, soft KD + module imitation + teacher init', 'recipe', True),
]


def loss_config(kind: str, temperature: float) -> D.DistillConfig:
    if kind == 'labels':
        return D.DistillConfig.labels_only()
    if kind == 'soft':
        return D.DistillConfig.soft_only(temperature)
    return D.DistillConfig.paper('s12', temperature=temperature)


def load_teacher(args, arch) -> torch.nn.Module:
    teacher = rk.PoolFormerClassifier(arch, num_classes=10, init_weights=False, **STEM)
    state = torch.load(os.path.join(args.out, 'checkpoints', 'teacher', D.Trainer.CHECKPOINT),
                       map_location='cpu', weights_only=True)
    teacher.load_state_dict(state['model'])
    return teacher.eval()


def one_run(index: int, args) -> None:
    """One training run in its own process (so its peak memory is its own): trains, switches a
    student to deploy form, evaluates, writes result.json next to its checkpoint."""
    name, label, kind, from_teacher = RUNS[index]
    if args.threads:
        torch.set_num_threads(args.threads)
    rk.use_backend(args.backend)
    data = load_digits(args.seed, args.quick, args.train_size)
    arch = QUICK_ARCH if args.quick else ARCH
    cfg = loss_config(kind, args.temperature)
    torch.manual_seed(args.seed + index)
    if name == 'teacher':
        model, teacher = rk.PoolFormerClassifier(arch, num_classes=10, **STEM), None
    else:
        teacher = load_teacher(args, arch)
        model = (rk.student_from_teacher(teacher) if from_teacher
                 else rk.RIFormerClassifier(arch, num_classes=10, **STEM))
        if not D.DistillationLoss(cfg).needs_teacher(0.0):
            teacher = None
    r = train_run(name, model, cfg, args, data, teacher)
    if name != 'teacher':
        model.switch_to_deploy()
    r.update(label=label, test_acc=D.accuracy(model, data[2], data[3]),
             world_size=Distributed.world)
    if Distributed.is_main():
        write_atomically(os.path.join(args.out, 'checkpoints', name, 'result.json'),
                         json.dumps(r))


def backend_times(student, teacher, loss_cfg, data, batch_size, steps):
    """ms per distillation training step (student forward with capture, teacher forward, loss,
    backward, AdamW) and per deploy-form inference batch, under the fused `cpu` backend and the
    `reference` one, from the same weights on the same batches (one untimed warm-up first)."""
    x, y = data[0][:batch_size * steps], data[1][:batch_size * steps]
    timed = D.TensorBatches(x, y, batch_size, shuffle=False)
    warm = D.TensorBatches(x[:batch_size], y[:batch_size], batch_size, shuffle=False)
    out = {}
    for backend in ('cpu', 'reference'):
        if not rk.available_backends()[backend].usable:
            out[backend] = None
            continue
        step_ms = {}
        with rk.use_backend(backend):
            for kind, cfg_, teacher_ in (('labels', D.DistillConfig.labels_only(), None),
                                         ('distill', loss_cfg, teacher)):
                for batches in (warm, timed):
                    model = copy.deepcopy(student)
                    cfg = D.TrainConfig(epochs=1, warmup_epochs=0, progress_bar=False)
                    trainer = D.Trainer(model, cfg, D.DistillationLoss(cfg_), teacher=teacher_)
                    t0 = time.perf_counter()
                    trainer.fit(batches)
                    step_ms[kind] = (time.perf_counter() - t0) / len(batches) * 1e3
            model.switch_to_deploy()
            model.eval()
            with torch.no_grad():
                model(x[:batch_size])
                t0 = time.perf_counter()
                for xb, _ in timed.epoch(0):
                    model(xb)
                infer_ms = (time.perf_counter() - t0) / len(timed) * 1e3
        out[backend] = dict(train_step_ms=step_ms['distill'], labels_step_ms=step_ms['labels'],
                            deploy_infer_ms=infer_ms)
    return out


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no curves.png", file=sys.stderr)
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        ep = [e['epoch'] for e in r['history']]
        ax1.plot(ep, [e['loss'] for e in r['history']], label=r['label'])
        ax2.plot(ep, [100 * e['test_acc'] for e in r['history']], label=r['label'])
    ax1.set(xlabel='epoch', ylabel='training loss (each run its own objective)', yscale='log',
            title='training loss')
    ax2.set(xlabel='epoch', ylabel='test accuracy (%, training form)', title='test accuracy')
    ax2.set_ylim(bottom=max(0, min(100 * e['test_acc'] for r in results
                                   for e in r['history']) - 5))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with replacing(path, suffix='.png') as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return True


def machine() -> str:
    cpu = platform.processor() or 'unknown CPU'
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    flags = ''
    try:
        with open('/proc/cpuinfo') as f:
            text = f.read()
        flags = 'AVX-512' if 'avx512f' in text else ('AVX2' if 'avx2' in text else '')
    except OSError:
        pass
    return (f"{cpu} ({flags}), {os.cpu_count()} logical CPUs visible, "
            f"{len(os.sched_getaffinity(0))} usable, torch threads {torch.get_num_threads()}, "
            f"torch {torch.__version__}, python {platform.python_version()}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default='distill_results')
    p.add_argument('--quick', action='store_true', help='tiny model and data, one epoch (CI)')
    p.add_argument('--epochs', type=int, default=30, help='student epochs')
    p.add_argument('--teacher-epochs', type=int, default=30)
    p.add_argument('--train-size', type=int, default=None,
                   help='use only the first N training images (a low-data setting)')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--accumulation', type=int, default=1)
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--warmup-epochs', type=float, default=2.0)
    p.add_argument('--temperature', type=float, default=1.0)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch)')
    p.add_argument('--backend', default='auto', help='backend of the students (auto: cpu)')
    p.add_argument('--resume', action='store_true',
                   help='continue from the checkpoints in --out (default: start afresh; a '
                   'resumed run\'s peak RSS covers only the epochs run now)')
    p.add_argument('--no-progress', action='store_true')
    p.add_argument('--same-process', action='store_true',
                   help='run everything in this process (faster start; the peak-RSS column is '
                   'then the cumulative high-water mark); implied by --quick')
    args = p.parse_args(argv)
    Distributed.init_from_env()
    if Distributed.world > 1:
        if args.resume:
            raise SystemExit("--resume is not supported under torchrun (only rank 0 keeps "
                             "checkpoints)")
        args.same_process = True      # the runs cannot be child processes of a torchrun rank
    if args.quick:
        args.epochs = args.teacher_epochs = 1
        args.warmup_epochs = 0
        args.same_process = True
    if args.threads:
        torch.set_num_threads(args.threads)
    args.load_at_start = os.getloadavg()[0]
    if Distributed.is_main():
        os.makedirs(args.out, exist_ok=True)
        if not args.resume:
            shutil.rmtree(os.path.join(args.out, 'checkpoints'), ignore_errors=True)
    Distributed.barrier()
    results = []
    ctx = multiprocessing.get_context('spawn')
    for index, (name, *_rest) in enumerate(RUNS):
        if args.same_process:
            one_run(index, args)
            Distributed.barrier()     # the next run reads the checkpoints rank 0 wrote
            if not Distributed.is_main():
                continue
        else:
            proc = ctx.Process(target=one_run, args=(index, args))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                raise SystemExit(f"run {name!r} failed (exit code {proc.exitcode})")
        with open(os.path.join(args.out, 'checkpoints', name, 'result.json')) as f:
            results.append(json.load(f))
        if name != 'teacher' and abs(results[-1]['test_acc'] -
                                     results[-1]['test_acc_train_form']) > 1.5 / 360:
            print(f"warning: {name}: deploy-form accuracy {results[-1]['test_acc']} differs "
                  f"from the training form's {results[-1]['test_acc_train_form']}",
                  file=sys.stderr)

    if not Distributed.is_main():
        # Timing and reporting are rank 0's (one process timing the backends alone).
        Distributed.barrier()
        dist.destroy_process_group()
        return results
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_digits(args.seed, args.quick, args.train_size)
    arch = QUICK_ARCH if args.quick else ARCH
    teacher = load_teacher(args, arch)
    torch.manual_seed(args.seed)
    times = backend_times(rk.student_from_teacher(teacher), teacher,
                          loss_config('recipe', args.temperature), data, args.batch_size,
                          steps=3 if args.quick else 10)
    write_results(args, results, times, argv, (data[0].shape[0], data[2].shape[0]))
    if Distributed.world > 1:
        Distributed.barrier()
        dist.destroy_process_group()
    return results


def write_results(args, results, times, argv, sizes):
    launcher = (f'torchrun --standalone --nproc_per_node {Distributed.world}'
                if Distributed.world > 1 else 'python')
    command = f'{launcher} python/train_distill.py ' + ' '.join(argv if argv is not None
                                                                else sys.argv[1:])
    lines = [f"# RIFormer distillation on digits (32x32)", "",
             f"- command: `{command.strip()}`",
             f"- machine: {machine()}",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average "
             f"(1 min) {args.load_at_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the "
             f"end (other work on the machine slows the timings)",
             f"- data: scikit-learn digits, train/test "
             f"{sizes[0]}/{sizes[1]} images, bilinear 8x8 -> 32x32, "
             f"random shifts of up to 2 px",
             f"- model: {QUICK_ARCH if args.quick else ARCH}, stem 3x3 stride 2; batch "
             f"{args.batch_size}, AdamW lr {args.lr}, weight decay 0.05, {args.warmup_epochs} "
             f"warm-up epochs, cosine; temperature {args.temperature}; (c) uses the paper's S12 "
             f"weights (1e-4, 1e-3, 1.0 per sample), L_in/L_out for the first 2/3, L_rel for "
             f"the first 1/6 of the steps",
             "", ("Peak RSS: the high-water mark of the run's own process (torch and data "
                  "included); in brackets, its growth over the level just before training."
                  if not args.same_process else "Peak RSS: all runs shared one process, so "
                  "this is its cumulative high-water mark (run without --quick/--same-process "
                  "for per-run figures); in brackets, the growth during the run."),
             "", "| run | epochs | test accuracy (deploy form) | s / epoch | peak RSS (MiB) |",
             "|---|---|---|---|---|"]
    for r in results:
        form = ' (no deploy form)' if r['name'] == 'teacher' else ''
        lines.append(f"| {r['label']} | {r['epochs']} | {100 * r['test_acc']:.2f}%{form} | "
                     f"{r['seconds_per_epoch']:.2f} | {r['peak_rss_mib']:.0f} "
                     f"(+{r['peak_rss_mib'] - r['rss_before_training_mib']:.0f}) |")
    lines += ["", "Backend time, per batch of "
              f"{args.batch_size}, from the recipe (c) student's initial weights: a distillation "
              "step = student forward with capture, teacher forward (plain torch), loss, "
              "backward, AdamW; a labels-only step = student forward, cross-entropy, backward, "
              "AdamW; inference = deploy form, no grad.", "",
              "| backend | distillation step (ms) | labels-only step (ms) | deploy inference (ms) |",
              "|---|---|---|---|"]
    for backend, t in times.items():
        if t is None:
            lines.append(f"| {backend} | unusable | unusable | unusable |")
        else:
            lines.append(f"| {backend} | {t['train_step_ms']:.1f} | {t['labels_step_ms']:.1f} "
                         f"| {t['deploy_infer_ms']:.1f} |")
    if all(times.values()):
        c, ref = times['cpu'], times['reference']
        lines += ["", "fused `cpu` vs `reference` (time ratio): distillation step "
                  f"{ref['train_step_ms'] / c['train_step_ms']:.2f}x, labels-only step "
                  f"{ref['labels_step_ms'] / c['labels_step_ms']:.2f}x, inference "
                  f"{ref['deploy_infer_ms'] / c['deploy_infer_ms']:.2f}x"]
    if plot(results, os.path.join(args.out, 'curves.png')):
        lines += ["", "![loss and accuracy curves](curves.png)"]
    write_atomically(os.path.join(args.out, 'results.md'), '\n'.join(lines) + '\n')
    write_atomically(os.path.join(args.out, 'results.json'), json.dumps(
        dict(command=command, machine=machine(), results=results, backend_times=times),
        indent=1) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
