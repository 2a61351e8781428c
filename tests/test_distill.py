"""Distillation: the teacher, student_from_teacher, the training init, each loss term against a
hand computation, the schedule, the trainer (checkpoint + resume) and fused vs reference."""
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

import riformer_kernels as rk
from helpers import OpLog, random_input, randomize_, rel_err
from riformer_kernels import distill as D

TINY = dict(layers=[1, 1, 2, 1], embed_dims=[4, 6, 8, 12])
STEM = dict(in_channels=1, in_patch_size=3, in_stride=2, in_pad=1)


def _teacher(**kw):
    return rk.PoolFormerClassifier(TINY, num_classes=3, **STEM, **kw)


# ---------------------------------------------------------------------------------------------
# teacher and student

def test_poolformer_block_against_its_definition():
    block = randomize_(rk.PoolFormerBlock(6)).double()
    x = random_input((2, 6, 4, 5))
    n1 = F.group_norm(x, 1, block.norm1.weight, block.norm1.bias, 1e-5)
    y = x + block.layer_scale_1[:, None, None] * (
        F.avg_pool2d(n1, 3, 1, 1, count_include_pad=False) - n1)
    h = F.gelu(F.conv2d(F.group_norm(y, 1, block.norm2.weight, block.norm2.bias, 1e-5),
                        block.mlp.fc1.weight, block.mlp.fc1.bias))
    out = y + block.layer_scale_2[:, None, None] * F.conv2d(h, block.mlp.fc2.weight,
                                                             block.mlp.fc2.bias)
    assert rel_err(block(x), out) <= 1e-14


def test_student_from_teacher_copies_every_shared_weight():
    teacher = randomize_(_teacher())
    student = rk.student_from_teacher(teacher)
    assert isinstance(student, rk.RIFormerClassifier) and not student.backbone.deploy
    t_state, s_state = teacher.state_dict(), student.state_dict()
    mixer = {k for k in s_state if '.token_mixer.affine.' in k}
    assert len(mixer) == 2 * 5 and set(s_state) - set(t_state) == mixer
    assert set(t_state) == set(s_state) - mixer
    for k in t_state:
        assert torch.equal(t_state[k], s_state[k]), k
    # the affine mixers keep the student's own (training) initialisation, not the teacher's
    w = torch.cat([s_state[k].flatten() for k in mixer if k.endswith('weight')])
    assert 0.005 < w.std() < 0.05
    # also when the teacher itself was built without the training init (e.g. to load weights)
    plain_teacher = _teacher(init_weights=False)
    s2 = rk.student_from_teacher(plain_teacher).state_dict()
    w2 = torch.cat([s2[k].flatten() for k in mixer if k.endswith('weight')])
    assert 0.005 < w2.std() < 0.05
    backbone = rk.student_from_teacher(teacher.backbone)
    assert isinstance(backbone, rk.RIFormer)
    with pytest.raises(TypeError, match='PoolFormer'):
        rk.student_from_teacher(student)
    with pytest.raises(ValueError, match='no deploy form'):
        teacher.switch_to_deploy()
    with pytest.raises(ValueError, match='no deploy form'):
        rk.PoolFormerBlock(4, deploy=True)


def test_init_weights_is_upstreams_training_init_and_a_checkpoint_overrides_it():
    model = rk.RIFormerClassifier('s12', num_classes=10)
    weights = torch.cat([m.weight.flatten() for m in model.modules()
                         if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))])
    # ~11.9M draws: the sample std of N(0, 0.02) is 0.02 to ~1e-5; truncation at +-2 never binds
    assert abs(weights.std().item() - 0.02) < 1e-4 and abs(weights.mean().item()) < 1e-4
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            assert torch.count_nonzero(m.bias) == 0
        if isinstance(m, torch.nn.GroupNorm):
            assert torch.all(m.weight == 1) and torch.count_nonzero(m.bias) == 0
    assert torch.all(model.backbone.network[0][0].layer_scale_1 == 1e-5)
    source = randomize_(rk.RIFormerClassifier(TINY, num_classes=3, **STEM))
    loaded = rk.load_checkpoint(rk.RIFormerClassifier(TINY, num_classes=3, **STEM),
                                source.state_dict())
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # without init_weights the layers keep PyTorch's default init (larger than std 0.02)
    plain = rk.RIFormerClassifier(TINY, num_classes=3, init_weights=False, **STEM)
    assert plain.backbone.network[0][0].mlp.fc1.weight.std() > 0.1


# ---------------------------------------------------------------------------------------------
# loss terms against hand computations

def test_soft_distillation_loss_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=torch.float64)
    t = torch.tensor([[0.5, 0.5, 2.0], [1.0, 0.0, -2.0]], dtype=torch.float64)
    for T in (1.0, 2.0):
        total = 0.0
        for n in range(2):
            zs = [math.exp(v / T) for v in s[n].tolist()]
            zt = [math.exp(v / T) for v in t[n].tolist()]
            ps = [v / sum(zs) for v in zs]
            pt = [v / sum(zt) for v in zt]
            total += sum(q * math.log(q / p) for p, q in zip(ps, pt))
        expected = total / 2 * T * T
        assert abs(D.soft_distillation_loss(s, t, T).item() - expected) <= 1e-14 * expected
    with pytest.raises(ValueError, match='logits of one shape'):
        D.soft_distillation_loss(s, t[:, :2])


def test_mixer_losses_by_hand():
    a = [rk.MixerIO(random_input((2, 3, 2, 2)), random_input((2, 3, 2, 2))) for _ in range(2)]
    b = [rk.MixerIO(random_input((2, 3, 2, 2)), random_input((2, 3, 2, 2))) for _ in range(2)]
    expected_in = sum(((s.input - t.input) ** 2).sum().item() / 24 for s, t in zip(a, b))
    assert abs(D.mixer_input_loss(a, b).item() - expected_in) <= 1e-14 * expected_in

    def ln(v):   # every token (n, h, w) normalised over its 3 channels, written out
        out = torch.empty_like(v)
        for n in range(2):
            for h in range(2):
                for w in range(2):
                    c = v[n, :, h, w]
                    m = sum(c.tolist()) / 3
                    var = sum((e - m) ** 2 for e in c.tolist()) / 3
                    out[n, :, h, w] = (c - m) / math.sqrt(var + 1e-5)
        return out
    expected_out = sum(((ln(s.output) - ln(t.output)) ** 2).mean().item() for s, t in zip(a, b))
    assert abs(D.mixer_output_loss(a, b).item() - expected_out) <= 1e-13 * expected_out
    with pytest.raises(ValueError, match='student recorded 1 and the teacher 2'):
        D.mixer_input_loss(a[:1], b)


def test_relation_loss_by_hand():
    # one sample, two tokens of two channels: student tokens (1, 0) and (2, 2) (cosine 1/sqrt 2),
    # teacher tokens (3, 0) and (0, -1) (cosine 0)
    s = torch.tensor([[[[1.0, 2.0]], [[0.0, 2.0]]]], dtype=torch.float64)   # (1, 2, 1, 2)
    t = torch.tensor([[[[3.0, 0.0]], [[0.0, -1.0]]]], dtype=torch.float64)
    r = 2 ** -0.5
    assert rel_err(D.token_relation(s), torch.tensor([[[1, r], [r, 1]]],
                                                     dtype=torch.float64)) <= 1e-15
    expected = 2 * r * r / 4           # two off-diagonal entries differ by r, mean of 4
    assert abs(D.relation_loss([s, s], [t, t]).item() - 2 * expected) <= 1e-15


def test_weights_schedule_and_total():
    cfg = D.DistillConfig(temperature=2.0)
    assert (cfg.mixer_in, cfg.mixer_out, cfg.relation, cfg.soft, cfg.hard) == (1e-4, 1e-3, 1.0,
                                                                             1.0, 0.0)
    assert D.DistillConfig.paper('s24').relation == 4.0
    loss = D.DistillationLoss(cfg)
    n = 4
    w = loss.weights(0.1, n)
    assert w == dict(soft=1.0, hard=0.0, mixer_in=1e-4 * n, mixer_out=1e-3 * n, relation=n)
    assert loss.weights(0.5, n)['relation'] == 0 and loss.weights(0.5, n)['mixer_in'] > 0
    assert loss.weights(0.7, n) == dict(soft=1.0, hard=0.0, mixer_in=0.0, mixer_out=0.0,
                                        relation=0.0)
    assert D.DistillationLoss(D.DistillConfig(per_sample=False)).weights(0.0, n)['relation'] == 1
    ls, lt = random_input((n, 5)), random_input((n, 5))
    mix_s = [rk.MixerIO(random_input((n, 3, 2, 2)), random_input((n, 3, 2, 2)))]
    mix_t = [rk.MixerIO(random_input((n, 3, 2, 2)), random_input((n, 3, 2, 2)))]
    st_s, st_t = [random_input((n, 3, 2, 2))], [random_input((n, 3, 2, 2))]
    total, terms = loss(ls, lt, None, mix_s, mix_t, st_s, st_t, progress=0.1)
    expected = (D.soft_distillation_loss(ls, lt, 2.0) + 1e-4 * n * D.mixer_input_loss(mix_s, mix_t)
                + 1e-3 * n * D.mixer_output_loss(mix_s, mix_t)
                + n * D.relation_loss(st_s, st_t))
    assert rel_err(total, expected) <= 1e-15
    assert set(terms) == {'soft', 'mixer_in', 'mixer_out', 'relation'}
    late, terms = loss(ls, lt, progress=0.9)
    assert set(terms) == {'soft'} and rel_err(late, D.soft_distillation_loss(ls, lt, 2.0)) == 0
    with pytest.raises(ValueError, match='temperature'):
        D.DistillConfig(temperature=0)
    with pytest.raises(ValueError, match='mixer_in must be >= 0'):
        D.DistillConfig(mixer_in=-1)
    with pytest.raises(TypeError, match='finite number'):
        D.DistillConfig(soft='1')
    with pytest.raises(ValueError, match='no paper weights'):
        D.DistillConfig.paper('b0')
    with pytest.raises(ValueError, match='no teacher outputs'):
        loss(ls, None, progress=0.9)


# ---------------------------------------------------------------------------------------------
# the trainer

def _data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _trainer(tmp_path, teacher, epochs=3, dtype=torch.float32, **cfg):
    torch.manual_seed(5)
    student = rk.student_from_teacher(teacher, drop_path_rate=0.2).to(dtype)
    cfg = dict(dict(warmup_epochs=1), **cfg)
    config = D.TrainConfig(epochs=epochs, lr=3e-3, accumulation=2,
                           checkpoint_dir=str(tmp_path) if tmp_path else None,
                           progress_bar=False, **cfg)
    loss = D.DistillationLoss(D.DistillConfig(hard=0.5))
    return D.Trainer(student, config, loss, teacher=teacher.to(dtype))


def test_trainer_resume_gives_the_uninterrupted_state(tmp_path):
    teacher = randomize_(_teacher())
    x, y = _data()
    batches = D.TensorBatches(x, y, batch_size=4, seed=3)   # 3 micro-batches, 2 steps/epoch
    full = _trainer(tmp_path / 'full', teacher)
    history = full.fit(batches)
    assert full.step == 6 and len(history['epochs']) == 3
    assert all(math.isfinite(v) for v in history['micro_loss'])
    assert set(history['epochs'][0]) >= {'loss', 'soft', 'hard', 'mixer_in', 'relation',
                                         'train_acc', 'seconds', 'lr'}
    assert 'relation' not in history['epochs'][-1]      # L_rel: first 1/6 of the steps only
    first = _trainer(tmp_path / 'cut', teacher)
    first.fit(batches, stop_after_epoch=1)
    assert first.epoch == 1 and os.path.exists(tmp_path / 'cut' / 'last.pt')
    resumed = _trainer(tmp_path / 'cut', teacher)     # a new process would build it afresh
    resumed.fit(batches)
    assert resumed.epoch == 3 and resumed.step == 6
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    for a, b in zip(full.optimizer.state_dict()['state'].values(),
                    resumed.optimizer.state_dict()['state'].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history['micro_loss'] == history['micro_loss']
    assert not [f for f in os.listdir(tmp_path / 'cut') if f != 'last.pt']


# Only where the extension is not built (it is in every `make test` run).
@pytest.mark.skipif(not rk.available_backends()['cpu'].usable,
                    reason=f"cpu backend unusable: {rk.available_backends()['cpu'].reason}")
def test_fused_backend_reproduces_reference_loss_curve():
    """fp64, drop path on, the distillation loss with every term (L_rel in the first step only,
    its schedule), 4 optimizer steps of 2 micro-batches: the cpu backend's loss curve is the
    reference's. Measured: 1 ulp (1e-16 relative); 1e-13 allows ~500 ulps of amplification by
    the steps, far below any difference in the computation (1e-7 for an fp32 slip)."""
    teacher = randomize_(_teacher()).double()
    x, y = _data(8)
    batches = D.TensorBatches(x.double(), y, batch_size=4, seed=1)
    curves = {}
    for backend in ('reference', 'cpu'):
        trainer = _trainer(None, teacher, epochs=4, dtype=torch.float64, warmup_epochs=0)
        log = OpLog()
        with rk.use_backend(backend), log:
            curves[backend] = trainer.fit(batches)['micro_loss']
        fused_ops = log.counts.get('riformer.mlp_backward.default', 0)
        assert fused_ops == (0 if backend == 'reference' else 8 * 5), log.counts
    ref = torch.tensor(curves['reference'], dtype=torch.float64)
    fused = torch.tensor(curves['cpu'], dtype=torch.float64)
    assert len(ref) == 8 and len(set(curves['reference'])) == 8
    assert rel_err(fused, ref) <= 1e-13


def test_save_atomically_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / 'ck.pt')
    D.save_atomically({'a': torch.arange(3)}, path)
    with pytest.raises(Exception):
        D.save_atomically({'a': lambda: None}, path)       # not picklable
    assert torch.equal(torch.load(path, weights_only=True)['a'], torch.arange(3))
    assert os.listdir(tmp_path) == ['ck.pt']


def test_trainer_refuses_a_teacher_loss_without_teacher():
    model = rk.RIFormerClassifier(TINY, num_classes=3, **STEM)
    with pytest.raises(ValueError, match='no teacher was given'):
        D.Trainer(model, D.TrainConfig(), D.DistillationLoss())
    with pytest.raises(ValueError, match='epochs must be a positive int'):
        D.TrainConfig(epochs=0)
