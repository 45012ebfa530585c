"""Distillation fine-tuning of a quantized student from its FP teacher (thrifty.datafree.distill)."""
import copy

import pytest
import torch
import torch.nn as nn

from thrifty.datafree import distill, synthesize
from thrifty.quant import PTQ, quantize


def _teacher():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    net.train()
    with torch.no_grad():
        for _ in range(10):
            net(torch.randn(32, 1, 8, 8) * 2.0 + 1.5)
    return net.eval()


def _kl(student, teacher, x):
    with torch.no_grad():
        return float(nn.functional.kl_div(student(x).log_softmax(-1), teacher(x).log_softmax(-1), log_target=True,
                                          reduction="batchmean"))


@pytest.fixture(scope="module")
def setup():
    teacher = _teacher()
    data = synthesize(teacher, n=64, method="bns", input_shape=(1, 8, 8), steps=20, batch_size=64, progress=False)
    res = quantize(teacher, PTQ(w_bits=2, a_bits=4, pipeline="rtn", first_last_bits=2), data.tensors[0],
                   progress=False)
    return teacher, data, res.model


def test_distill_lowers_kl_and_leaves_teacher_alone(setup):
    teacher, data, q = setup
    student = copy.deepcopy(q)
    t_state = copy.deepcopy(teacher.state_dict())
    teacher.train()
    x = data.tensors[0]
    before = _kl(student, teacher.eval(), x)
    teacher.train()
    out = distill(student, teacher, data=data, steps=60, lr=3e-3, batch_size=32, progress=False)
    assert teacher.training and all(m.training for m in teacher.modules())  # mode restored
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t_state[k]), k
    assert out["kept"] and out["steps"] == 60
    assert out["kl_before"] == pytest.approx(before, rel=1e-4)
    assert out["kl_after"] < 0.7 * out["kl_before"]
    assert _kl(student, teacher.eval(), x) == pytest.approx(out["kl_after"], rel=1e-4)
    assert all(not p.requires_grad and p.grad is None for p in student.parameters())


def test_distill_keeps_pruned_weights_zero_and_reverts_when_worse(setup):
    teacher, data, q = setup
    student = copy.deepcopy(q)
    conv = [m for m in student.modules() if isinstance(m, nn.Conv2d)][1]
    with torch.no_grad():
        conv.weight[:, ::2] = 0.0
    zero = conv.weight.eq(0).clone()
    distill(student, teacher, data=data.tensors[0], steps=20, lr=3e-3, progress=False)
    assert bool(conv.weight[zero].eq(0).all())
    # an absurd learning rate makes things worse: the student comes back unchanged
    student2 = copy.deepcopy(q)
    state = copy.deepcopy(student2.state_dict())
    out = distill(student2, teacher, data=data, steps=5, lr=50.0, progress=False)
    assert not out["kept"] and out["kl_after"] == out["kl_before"]
    for k, v in student2.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_distill_bad_input(setup):
    teacher, data, q = setup
    with pytest.raises(ValueError, match="empty"):
        distill(q, teacher, data=torch.zeros(0, 1, 8, 8))
    with pytest.raises(ValueError, match="steps"):
        distill(q, teacher, data=data, steps=-1)
    with pytest.raises(ValueError, match="positive"):
        distill(q, teacher, data=data, lr=0.0)
    with pytest.raises(TypeError, match="nn.Module"):
        distill(q, "teacher", data=data)
    assert distill(q, teacher, data=data, steps=0)["steps"] == 0
