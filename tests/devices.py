"""The devices the device-parametrized tests run on: the CPU always (CI), and CUDA where torch sees a GPU
(``scripts/gpu_check.sh`` runs them on a lent GPU machine). Test ids end in the device, so ``-k cuda``
selects the GPU cases."""

from __future__ import annotations

import dataclasses

import torch

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
needs_cuda = dict(condition=not torch.cuda.is_available(),
                  reason="needs a CUDA device: scripts/gpu_check.sh runs it on a lent GPU machine")


def on_cpu(res):
    """A MoEOutput with every tensor (statistics too) on the CPU, where the float64 reference is."""
    stats = {f.name: getattr(res.stats, f.name).cpu() for f in dataclasses.fields(res.stats)}
    return dataclasses.replace(res, out=res.out.cpu(), aux_loss=res.aux_loss.cpu(), z_loss=res.z_loss.cpu(),
                               stats=dataclasses.replace(res.stats, **stats))
