"""Domain shift, measured with the frozen backbone's own BatchNorm statistics.

A pretrained BatchNorm layer stores the mean and variance of its inputs over the *source* images
(``running_mean``/``running_var``). Feeding target images through the frozen backbone (eval mode)
and measuring the same per-channel mean and variance at every BatchNorm input shows how far, and at
which depth, the target sits from the data the backbone was made for. This is the statistic AdaBN
(Li et al., 2016) corrects for, and what test-time adaptation methods monitor.

The signal is the per-channel Gaussian KL divergence ``KL(target || source)``

    0.5 * (var_t / var_s + (mean_t - mean_s)**2 / var_s - 1 - log(var_t / var_s))

averaged over channels, then over BatchNorm layers. 0 means the target looks like the source to
every layer. It needs no source images and no extra metadata, so it works for torchvision's
ImageNet weights as well as for weights pretrained here; backbones without BatchNorm get ``None``.

Measured with the demo's source backbone on the training splits (bench/RESULTS.md): the source
digits 0-4 themselves 0.008; target 5-9: 0.14; 5-9 inverted + rotated: 0.34; 5-9 drawn in
texture: 1.05. A prototype with 5-9 on a uniform-noise background measured 0.45.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class _Moments:
    """Per-channel running sums of one BatchNorm layer's input (float64, over every pixel)."""

    def __init__(self, layer: nn.modules.batchnorm._BatchNorm) -> None:
        self.layer = layer
        self.count = 0
        self.total: torch.Tensor | None = None
        self.total_sq: torch.Tensor | None = None

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].detach().to(torch.float64)
        dims = [d for d in range(x.dim()) if d != 1]  # every dim but channels
        total, total_sq = x.sum(dims), (x * x).sum(dims)
        self.count += x.numel() // x.shape[1]
        self.total = total if self.total is None else self.total + total
        self.total_sq = total_sq if self.total_sq is None else self.total_sq + total_sq

    def kl_to_source(self) -> float | None:
        layer = self.layer
        if (
            self.total is None
            or self.total_sq is None
            or layer.running_mean is None
            or layer.running_var is None
        ):
            return None
        mean_t = self.total / self.count
        var_t = (self.total_sq / self.count - mean_t**2).clamp_min(0) + layer.eps
        mean_s = layer.running_mean.to(torch.float64)
        var_s = layer.running_var.to(torch.float64) + layer.eps
        kl = 0.5 * (var_t / var_s + (mean_t - mean_s) ** 2 / var_s - 1 - torch.log(var_t / var_s))
        return float(kl.mean())


class BatchNormMoments:
    """Collects BatchNorm input moments while ``collecting`` is true, from forward passes made
    for another purpose too: the baseline measures the shift during feature extraction, so every
    image goes through the backbone once (training/features.py).
    """

    def __init__(self, backbone: nn.Module) -> None:
        layers = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.moments = [_Moments(layer) for layer in layers]
        self.collecting = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> BatchNormMoments:
        self._handles = [m.layer.register_forward_hook(self._hook(m)) for m in self.moments]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, moments: _Moments):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.collecting:
                moments(module, inputs, output)

        return hook

    def shift(self) -> float | None:
        """Mean per-channel KL(target || source) over every BatchNorm layer; None without BatchNorm
        or before any image was collected."""
        values = [v for v in (m.kl_to_source() for m in self.moments) if v is not None]
        return sum(values) / len(values) if values else None


def batchnorm_shift(
    backbone: nn.Module, batches: Iterable[torch.Tensor], device: torch.device
) -> float | None:
    """Mean per-channel KL(target || source) over every BatchNorm layer; None without BatchNorm.

    ``batches`` are target images, preprocessed as for evaluation. The backbone runs in eval mode
    under ``no_grad``, so nothing about it changes.
    """
    was_training = backbone.training
    backbone.eval()
    try:
        with BatchNormMoments(backbone) as moments, torch.no_grad():
            moments.collecting = True
            for batch in batches:
                backbone(batch.to(device))
    finally:
        backbone.train(was_training)
    return moments.shift()
