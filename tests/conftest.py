"""Test-session settings: one intra-op thread (tiny tensors on a 2-core CI machine run faster without
thread hand-offs, and tests that spawn processes do not oversubscribe the cores)."""

import torch

torch.set_num_threads(1)

