"""Test doubles shared by the method tests."""

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
