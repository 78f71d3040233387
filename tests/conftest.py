"""Test-session settings and shared fixtures: one intra-op thread (tiny tensors on a 2-core CI machine run faster
without thread hand-offs, and tests that spawn processes do not oversubscribe the cores); ``corpus``, a small
code corpus with its token cache for the end-to-end tests."""

import pytest
import torch

CODE_TEXT = "".join(f"class C{i}:\n    def m(self, x):\n        return x + {i}\n\n" for i in range(300))

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A directory holding ``c.txt`` (a small code corpus) and ``cache/`` (its token cache, filled on first use)."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "c.txt").write_text(CODE_TEXT)
    return d
