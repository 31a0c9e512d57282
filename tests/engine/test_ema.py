import pytest
import torch
from torch import nn

from farcluss.engine.ema import copy_into_teacher, ema_momentum, make_teacher, update_teacher


def _linear_bn() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))


def _set(module: nn.Sequential, weight, bias, bn_weight, running_mean, running_var, tracked):
    with torch.no_grad():
        module[0].weight.copy_(torch.tensor([weight]))
        module[0].bias.fill_(bias)
        module[1].weight.fill_(bn_weight)
        module[1].running_mean.fill_(running_mean)
        module[1].running_var.fill_(running_var)
        module[1].num_batches_tracked.fill_(tracked)


@pytest.mark.parametrize("step, cap, expected", [
    (0, 0.999, 0.0),      # the first update copies the student
    (1, 0.999, 0.5),
    (9, 0.999, 0.9),
    (99, 0.999, 0.99),
    (5000, 0.999, 0.999),  # capped at m
    (9, 0.5, 0.5),
    (100, 0.0, 0.0),
])
def test_momentum_warms_up_then_caps(step, cap, expected):
    assert ema_momentum(step, cap) == pytest.approx(expected)


def test_teacher_is_a_detached_copy_in_eval_mode():
    student = _linear_bn()
    teacher = make_teacher(student)
    assert not teacher.training and student.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    for t_value, s_value in zip(teacher.state_dict().values(), student.state_dict().values()):
        assert torch.equal(t_value, s_value)
    with torch.no_grad():
        student[0].weight.add_(1.0)
    assert not torch.equal(teacher[0].weight, student[0].weight)


def test_update_by_hand_averages_parameters_and_bn_statistics():
    teacher, student = _linear_bn(), _linear_bn()
    _set(teacher, [1.0, 2.0], 0.0, 1.0, running_mean=0.0, running_var=1.0, tracked=3)
    _set(student, [3.0, 6.0], 4.0, 5.0, running_mean=4.0, running_var=5.0, tracked=7)
    update_teacher(teacher, student, momentum=0.75)
    # ξ ← 0.75·ξ + 0.25·θ
    assert torch.allclose(teacher[0].weight, torch.tensor([[1.5, 3.0]]))
    assert torch.allclose(teacher[0].bias, torch.tensor([1.0]))
    assert torch.allclose(teacher[1].weight, torch.tensor([2.0]))
    assert torch.allclose(teacher[1].running_mean, torch.tensor([1.0]))
    assert torch.allclose(teacher[1].running_var, torch.tensor([2.0]))
    # a counter is copied, never averaged
    assert teacher[1].num_batches_tracked.item() == 7
    assert teacher[1].num_batches_tracked.dtype == torch.int64
    # the student is untouched
    assert torch.equal(student[0].weight, torch.tensor([[3.0, 6.0]]))


def test_momentum_zero_copies_and_one_freezes():
    teacher, student = _linear_bn(), _linear_bn()
    _set(teacher, [1.0, 2.0], 0.0, 1.0, 0.0, 1.0, 0)
    _set(student, [0.3, -0.7], 0.1, 0.9, 0.2, 0.6, 5)
    update_teacher(teacher, student, momentum=1.0)
    assert torch.equal(teacher[0].weight, torch.tensor([[1.0, 2.0]]))
    assert torch.equal(teacher[1].running_var, torch.tensor([1.0]))
    update_teacher(teacher, student, momentum=0.0)
    for t_value, s_value in zip(teacher.state_dict().values(), student.state_dict().values()):
        assert torch.equal(t_value, s_value)


def test_update_gives_no_gradient_to_the_teacher():
    student = _linear_bn()
    teacher = make_teacher(student)
    student(torch.randn(4, 2)).sum().backward()
    update_teacher(teacher, student, momentum=0.5)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_copy_into_teacher_restarts_from_the_student():
    student = _linear_bn()
    teacher = make_teacher(student)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(torch.randn_like(param))
        student[1].running_mean.fill_(3.0)
    copy_into_teacher(teacher, student)
    for t_value, s_value in zip(teacher.state_dict().values(), student.state_dict().values()):
        assert torch.equal(t_value, s_value)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())


def test_models_of_different_structure_are_refused():
    teacher = _linear_bn()
    student = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1), nn.Linear(1, 1))
    with pytest.raises(ValueError):
        update_teacher(teacher, student, momentum=0.5)
