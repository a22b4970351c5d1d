"""Random-weight classifiers whose every branch speaks: for benchmarks and exactness tests.

timm zero-initialises the last BatchNorm of each residual branch, so a freshly built
ResNet's branches add nothing and a timing or an exactness check would skip most of
the network. :func:`randomise_batchnorm` gives every BatchNorm random statistics and
affine parameters instead.
"""

from __future__ import annotations

import torch
from torch import nn


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every BatchNorm of ``model`` gets weight U(0.5, 1.5), bias N(0, 0.1²), running mean
    N(0, 0.1²) and running variance U(0.5, 1.5) (seeded); returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(c, generator=g))
                    m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model.eval()
