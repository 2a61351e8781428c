"""Training a RIFormer student from a PoolFormer teacher: the loss terms and a small trainer.

The recipe (RIFormer, arXiv 2304.05659, sections 3-4; docs/distillation.md says what is and is
not stated there):

    L = w_soft L_soft + l1 L_in + l2 L_out + l3 L_rel      (+ w_hard CE(labels), 0 by default)

* L_soft: KL(teacher || student) of the temperature-T softmaxes, times T^2, batch mean.
* L_in:  MSE between the token-mixer inputs norm1(x) of matching blocks (summed over blocks).
* L_out: MSE between the token-mixer outputs after a LayerNorm over channels (per token, no
  affine), summed over blocks.
* L_rel: MSE between token-relation matrices R = F^ F^T, F^ the stage output's tokens
  (N, H*W, C) normalised to unit length over channels; at every stage output, summed.

l1, l2, l3 are per-sample weights (the paper's): by default (`per_sample=True`) each feature
term is multiplied by the batch size, i.e. the batch *sum* of per-sample mean squared errors.
L_in and L_out are active for the first `feature_until` (2/3) of the optimizer steps, L_rel for
the first `relation_until` (1/6). Mixer records come from `capture.capture_mixer_io`, stage
outputs from `capture.capture_stage_outputs`.

`Trainer`: AdamW (no weight decay on 1-D parameters: norms, biases, layer scales), linear warm-up
then cosine decay per optimizer step, gradient accumulation, a checkpoint after every epoch
(written atomically) and resume from it, tqdm progress bars.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .atomic import replacing
from .capture import capture_mixer_io, capture_stage_outputs

# (l1, l2, l3) of the paper per architecture.
PAPER_WEIGHTS = {
    's12': (1e-4, 1e-3, 1.0),
    's24': (3e-4, 5e-3, 4.0),
    's36': (1e-4, 1e-3, 1.0),
    'm36': (1e-4, 1e-3, 1.0),
    'm48': (1e-4, 1e-3, 1.0),
}


@dataclass(frozen=True)
class DistillConfig:
    """Weights and schedule of the distillation loss. Defaults: the paper's S12 recipe, with
    temperature 1 (the paper does not state one)."""
    soft: float = 1.0            # L_soft
    mixer_in: float = 1e-4       # l1, L_in (per sample)
    mixer_out: float = 1e-3      # l2, L_out (per sample)
    relation: float = 1.0        # l3, L_rel (per sample)
    hard: float = 0.0            # cross-entropy with the labels (not in the paper's recipe)
    temperature: float = 1.0
    feature_until: float = 2 / 3   # fraction of the optimizer steps with L_in, L_out
    relation_until: float = 1 / 6  # fraction with L_rel
    per_sample: bool = True      # multiply l1, l2, l3 by the batch size

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == 'per_sample':
                if not isinstance(v, bool):
                    raise TypeError(f"DistillConfig.per_sample must be a bool, got {v!r}")
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise TypeError(f"DistillConfig.{f.name} must be a finite number, got {v!r}")
            if v < 0:
                raise ValueError(f"DistillConfig.{f.name} must be >= 0, got {v}")
        if self.temperature <= 0:
            raise ValueError(f"DistillConfig.temperature must be > 0, got {self.temperature}")
        for name in ('feature_until', 'relation_until'):
            if getattr(self, name) > 1:
                raise ValueError(f"DistillConfig.{name} is a fraction of training, got "
                                 f"{getattr(self, name)}")

    @classmethod
    def paper(cls, arch: str = 's12', **changes) -> "DistillConfig":
        """The paper's weights for `arch` (s12, s24, s36, m36, m48), with `changes`."""
        if arch not in PAPER_WEIGHTS:
            raise ValueError(f"no paper weights for arch {arch!r}; choose one of "
                             f"{sorted(PAPER_WEIGHTS)}")
        l1, l2, l3 = PAPER_WEIGHTS[arch]
        return cls(**dict(dict(mixer_in=l1, mixer_out=l2, relation=l3), **changes))

    @classmethod
    def labels_only(cls) -> "DistillConfig":
        """Plain supervised training: cross-entropy with the labels, no teacher."""
        return cls(soft=0.0, mixer_in=0.0, mixer_out=0.0, relation=0.0, hard=1.0)

    @classmethod
    def soft_only(cls, temperature: float = 1.0) -> "DistillConfig":
        """Soft-label distillation alone (no labels, no feature terms)."""
        return cls(soft=1.0, mixer_in=0.0, mixer_out=0.0, relation=0.0, hard=0.0,
                   temperature=temperature)


# ---------------------------------------------------------------------------------------------
# loss terms

def soft_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           temperature: float = 1.0) -> torch.Tensor:
    """KL(p_teacher || p_student) of softmax(logits / T), summed over classes, averaged over the
    batch, times T^2 (so the gradient's scale does not depend on T). The teacher is detached."""
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"soft_distillation_loss expects two (N, classes) logits of one shape, "
                         f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_ps = F.log_softmax(student_logits / temperature, dim=1)
    log_pt = F.log_softmax(teacher_logits.detach().to(student_logits.dtype) / temperature, dim=1)
    kl = F.kl_div(log_ps, log_pt, reduction='batchmean', log_target=True)
    return kl * temperature ** 2


def _pairs(student, teacher, what: str):
    student, teacher = list(student), list(teacher)
    if len(student) != len(teacher):
        raise ValueError(f"{what}: the student recorded {len(student)} and the teacher "
                         f"{len(teacher)}; they must have the same blocks/stages")
    for i, (s, t) in enumerate(zip(student, teacher)):
        if s.shape != t.shape:
            raise ValueError(f"{what} {i}: student shape {tuple(s.shape)} differs from the "
                             f"teacher's {tuple(t.shape)}")
    return zip(student, teacher)


def _sum(terms):
    total = None
    for term in terms:
        total = term if total is None else total + term
    if total is None:
        raise ValueError("nothing to compare: no records were given")
    return total


def mixer_input_loss(student_io, teacher_io) -> torch.Tensor:
    """Sum over blocks of the MSE between the token mixers' inputs (MixerIO.input)."""
    pairs = _pairs([r.input for r in student_io], [r.input for r in teacher_io], 'mixer input')
    return _sum((F.mse_loss(s, t.detach().to(s.dtype)) for s, t in pairs))


def token_layer_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm of every token over its C channels (no affine) of an (N, C, H, W) tensor."""
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def mixer_output_loss(student_io, teacher_io) -> torch.Tensor:
    """Sum over blocks of the MSE between the token mixers' outputs, each `token_layer_norm`ed."""
    pairs = _pairs([r.output for r in student_io], [r.output for r in teacher_io],
                   'mixer output')
    return _sum((F.mse_loss(token_layer_norm(s), token_layer_norm(t.detach().to(s.dtype)))
                 for s, t in pairs))


def token_relation(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, T, T), T = H*W: cosine similarity of every pair of tokens (each
    token's C-vector normalised to unit length, times the transpose)."""
    if x.dim() != 4:
        raise ValueError(f"token_relation expects an (N, C, H, W) tensor, got {tuple(x.shape)}")
    tokens = F.normalize(x.flatten(2).transpose(1, 2), dim=2)
    return tokens @ tokens.transpose(1, 2)


def relation_loss(student_features, teacher_features) -> torch.Tensor:
    """Sum over stages of the MSE between token-relation matrices."""
    pairs = _pairs(student_features, teacher_features, 'stage output')
    return _sum((F.mse_loss(token_relation(s), token_relation(t.detach().to(s.dtype)))
                 for s, t in pairs))


class DistillationLoss:
    """L = soft L_soft + l1 L_in + l2 L_out + l3 L_rel + hard CE, with the schedule of
    `DistillConfig`. Call with `progress` = the fraction of optimizer steps done; returns the
    total and a dict of every active term's (unweighted) value as a float."""

    def __init__(self, config: DistillConfig | None = None):
        self.config = config or DistillConfig()

    def weights(self, progress: float, batch: int = 1) -> dict:
        """Effective weight of every term at `progress` (0 when inactive) for a batch of `batch`
        samples."""
        c = self.config
        k = batch if c.per_sample else 1
        feature = progress < c.feature_until
        return dict(soft=c.soft, hard=c.hard,
                    mixer_in=c.mixer_in * k if feature else 0.0,
                    mixer_out=c.mixer_out * k if feature else 0.0,
                    relation=c.relation * k if progress < c.relation_until else 0.0)

    def needs_teacher(self, progress: float) -> bool:
        w = self.weights(progress)
        return any(w[k] > 0 for k in ('soft', 'mixer_in', 'mixer_out', 'relation'))

    def needs_mixers(self, progress: float) -> bool:
        w = self.weights(progress)
        return w['mixer_in'] > 0 or w['mixer_out'] > 0

    def needs_stages(self, progress: float) -> bool:
        return self.weights(progress)['relation'] > 0

    def __call__(self, student_logits, teacher_logits=None, labels=None, student_mixers=(),
                 teacher_mixers=(), student_stages=(), teacher_stages=(), progress: float = 0.0):
        w = self.weights(progress, student_logits.shape[0])
        terms = {}
        if w['hard'] > 0:
            if labels is None:
                raise ValueError("the loss has a label (hard) term but no labels were given")
            terms['hard'] = F.cross_entropy(student_logits, labels)
        if self.needs_teacher(progress) and teacher_logits is None:
            raise ValueError("the loss has teacher terms at this progress but no teacher "
                             "outputs were given")
        if w['soft'] > 0:
            terms['soft'] = soft_distillation_loss(student_logits, teacher_logits,
                                                   self.config.temperature)
        if w['mixer_in'] > 0:
            terms['mixer_in'] = mixer_input_loss(student_mixers, teacher_mixers)
        if w['mixer_out'] > 0:
            terms['mixer_out'] = mixer_output_loss(student_mixers, teacher_mixers)
        if w['relation'] > 0:
            terms['relation'] = relation_loss(student_stages, teacher_stages)
        if not terms:
            raise ValueError("every loss weight is zero at this progress: nothing to train")
        total = _sum((w[k] * v for k, v in terms.items()))
        return total, {k: v.item() for k, v in terms.items()}


# ---------------------------------------------------------------------------------------------
# data and the trainer

class TensorBatches:
    """Mini-batches of in-memory (images, labels): a fresh shuffle per epoch from a generator
    seeded by (seed, epoch), so a resumed run sees the same batches as an uninterrupted one.
    `transform(images, generator)` (optional) augments a batch with that generator."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 shuffle: bool = True, seed: int = 0, transform=None):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed, self.transform = (batch_size, shuffle, seed,
                                                                     transform)

    def __len__(self) -> int:
        return math.ceil(self.images.shape[0] / self.batch_size)

    def epoch(self, epoch: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = self.images.shape[0]
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i:i + self.batch_size]
            x = self.images[idx]
            if self.transform is not None:
                x = self.transform(x, g)
            yield x, self.labels[idx]


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 256) -> float:
    """Top-1 accuracy of `model` in eval mode (its training mode is restored)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        correct += (model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum()
    model.train(was_training)
    return int(correct) / images.shape[0]


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0     # linear warm-up from 0, then cosine to min_lr
    min_lr: float = 1e-5
    accumulation: int = 1          # micro-batches per optimizer step
    clip_grad: float | None = None
    checkpoint_dir: str | None = None   # `last.pt` there after every epoch; resumed from
    resume: bool = True
    progress_bar: bool = True
    desc: str = 'train'

    def __post_init__(self):
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"TrainConfig.epochs must be a positive int, got {self.epochs!r}")
        if not isinstance(self.accumulation, int) or self.accumulation < 1:
            raise ValueError(f"TrainConfig.accumulation must be a positive int, got "
                             f"{self.accumulation!r}")
        for name in ('lr', 'weight_decay', 'warmup_epochs', 'min_lr'):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")


def save_atomically(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, flushed to disk, then os.replace: a
    reader (or a resumed run after a crash) sees the old file or the new one, never a part."""
    with replacing(path) as tmp:
        torch.save(obj, tmp)


def _param_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay),
            dict(params=no_decay, weight_decay=0.0)]


class Trainer:
    """Trains `model` with `loss` (a DistillationLoss) and, when the loss needs one, a frozen
    `teacher` (run in eval mode without gradients). `evaluate(model) -> dict` (optional) runs
    after every epoch; its values go into the history."""

    CHECKPOINT = 'last.pt'

    def __init__(self, model: nn.Module, config: TrainConfig, loss: DistillationLoss,
                 teacher: nn.Module | None = None, evaluate=None):
        if not isinstance(loss, DistillationLoss):
            raise TypeError(f"loss must be a DistillationLoss, got {type(loss).__name__}")
        if teacher is None and loss.needs_teacher(0.0):
            raise ValueError("the loss has teacher terms (soft / mixer / relation weights > 0) "
                             "but no teacher was given")
        self.model, self.config, self.loss, self.evaluate = model, config, loss, evaluate
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay),
                                           lr=config.lr)
        self.epoch = 0          # epochs completed
        self.step = 0           # optimizer steps taken
        self.history = dict(epochs=[], micro_loss=[])
        self._total_steps = None
        self._warmup_steps = 0

    # schedule ---------------------------------------------------------------------------------
    def _lr_at(self, step: int) -> float:
        c = self.config
        if step < self._warmup_steps:
            return c.lr * (step + 1) / self._warmup_steps
        span = max(1, self._total_steps - self._warmup_steps)
        progress = min(1.0, (step - self._warmup_steps) / span)
        return c.min_lr + (c.lr - c.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    def _set_lr(self):
        lr = self._lr_at(self.step)
        for group in self.optimizer.param_groups:
            group['lr'] = lr
        return lr

    # checkpoints ------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> str | None:
        d = self.config.checkpoint_dir
        return os.path.join(d, self.CHECKPOINT) if d else None

    def state_dict(self) -> dict:
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    epoch=self.epoch, step=self.step, rng=torch.get_rng_state(),
                    history=self.history, config=asdict(self.config))

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state['model'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.epoch, self.step = int(state['epoch']), int(state['step'])
        torch.set_rng_state(state['rng'])
        self.history = state['history']

    def _maybe_resume(self) -> bool:
        path = self.checkpoint_path
        if not (path and self.config.resume and os.path.exists(path)):
            return False
        self.load_state_dict(torch.load(path, map_location='cpu', weights_only=True))
        return True

    # training ---------------------------------------------------------------------------------
    def _forward_loss(self, x, y, progress):
        loss = self.loss
        need_mix, need_stage = loss.needs_mixers(progress), loss.needs_stages(progress)
        with ExitStack() as stack:
            s_mix = stack.enter_context(capture_mixer_io(self.model)) if need_mix else []
            s_stage = stack.enter_context(capture_stage_outputs(self.model)) if need_stage else []
            logits = self.model(x)
        t_logits, t_mix, t_stage = None, [], []
        if loss.needs_teacher(progress):
            with torch.no_grad(), ExitStack() as stack:
                t_mix = stack.enter_context(capture_mixer_io(self.teacher)) if need_mix else []
                t_stage = (stack.enter_context(capture_stage_outputs(self.teacher))
                           if need_stage else [])
                t_logits = self.teacher(x)
        total, terms = loss(logits, t_logits, y, s_mix, t_mix, s_stage, t_stage, progress)
        return total, terms, logits

    def fit(self, batches: TensorBatches, stop_after_epoch: int | None = None) -> dict:
        """Train to `config.epochs` (resuming from the checkpoint when there is one). With
        `stop_after_epoch`, return after that many epochs are complete (as if interrupted)."""
        c = self.config
        steps_per_epoch = math.ceil(len(batches) / c.accumulation)
        self._total_steps = c.epochs * steps_per_epoch
        self._warmup_steps = round(c.warmup_epochs * steps_per_epoch)
        self._maybe_resume()
        bar_cls = _progress_bar(c.progress_bar)
        self.model.train()
        for epoch in range(self.epoch, c.epochs):
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                break
            t0 = time.perf_counter()
            n_micro = len(batches)
            sums, count, correct = {}, 0, 0
            bar = bar_cls(total=n_micro, desc=f"{c.desc} {epoch + 1}/{c.epochs}", leave=False)
            for i, (x, y) in enumerate(batches.epoch(epoch)):
                group_start = (i // c.accumulation) * c.accumulation
                group_size = min(c.accumulation, n_micro - group_start)
                progress = self.step / self._total_steps
                if i == group_start:
                    lr = self._set_lr()
                total, terms, logits = self._forward_loss(x, y, progress)
                (total / group_size).backward()
                if i == group_start + group_size - 1:
                    if c.clip_grad is not None:
                        nn.utils.clip_grad_norm_(self.model.parameters(), c.clip_grad)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                value = total.item()
                self.history['micro_loss'].append(value)
                b = x.shape[0]
                count += b
                correct += int((logits.detach().argmax(1) == y).sum())
                sums['loss'] = sums.get('loss', 0.0) + value * b
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v * b
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
                bar.update(1)
            bar.close()
            record = {k: v / count for k, v in sums.items()}
            record.update(epoch=epoch + 1, train_acc=correct / count, lr=lr,
                          seconds=time.perf_counter() - t0)
            if self.evaluate is not None:
                record.update(self.evaluate(self.model))
                self.model.train()
            self.history['epochs'].append(record)
            self.epoch = epoch + 1
            if self.checkpoint_path:
                save_atomically(self.state_dict(), self.checkpoint_path)
        return self.history


class _PlainBar:
    def __init__(self, **_):
        pass

    def set_postfix(self, **_):
        pass

    def update(self, _n):
        pass

    def close(self):
        pass


def _progress_bar(enabled: bool):
    if not enabled:
        return _PlainBar
    try:
        from tqdm.auto import tqdm
    except ImportError:   # tqdm is an optional extra
        return _PlainBar
    return tqdm
