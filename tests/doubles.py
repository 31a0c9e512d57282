"""Test doubles shared by the tests."""

import torch
from torch import nn


class FixedTeacher(nn.Module):
    """Returns log-probabilities, so softmax gives back exactly `probs`; counts its calls."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.register_buffer("log_probs", probs.log())
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        assert images.shape[0] == self.log_probs.shape[0]
        assert images.shape[-2:] == self.log_probs.shape[-2:]
        return self.log_probs.clone(), images


class FakeSummaryWriter:
    """Records add_scalar calls in place of torch.utils.tensorboard.SummaryWriter."""

    instances = []

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.scalars = []
        self.flushes = 0
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        self.flushes += 1
