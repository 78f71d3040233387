"""The devices the device-parametrized tests run on: the CPU always (CI), and CUDA where torch sees a GPU
(``scripts/gpu_check.sh`` runs them on a lent GPU machine). Test ids end in the device, so ``-k cuda``
selects the GPU cases."""

from __future__ import annotations

import torch

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
needs_cuda = dict(condition=not torch.cuda.is_available(),
                  reason="needs a CUDA device: scripts/gpu_check.sh runs it on a lent GPU machine")
