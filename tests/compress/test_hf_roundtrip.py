"""Compressing Hugging Face MoE checkpoints end to end (tiny configs of tests/archs.py, random weights): the
compressed model at 8 bits gives the source's logits closely."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from archs import hf_configs, randomize  # noqa: E402

from moekit.compress import compress, load_compressed  # noqa: E402
from moekit.formats import from_pretrained  # noqa: E402


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v2"])
def test_hf_moe_checkpoint_compresses_end_to_end(tmp_path, arch):
    torch.manual_seed(0)
    hf = getattr(transformers, "AutoModelForCausalLM").from_config(hf_configs()[arch]())
    randomize(hf)
    hf.save_pretrained(tmp_path / "hf")
    # rows of 16 to 48 columns are single groups: 8-bit costs 8.7 to 10 effective bits there
    res = compress(tmp_path / "hf", tmp_path / "dst", 10.0, mixed=False, progress=False)
    assert res.effective_bits <= 10.0
    assert {b for w in res.widths.values() for b in (w if isinstance(w, list) else [w])} == {8}
    src, q = from_pretrained(tmp_path / "hf", dtype="fp32"), load_compressed(tmp_path / "dst")
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = src(ids).logits, q.float()(ids).logits
    # (peaked random routers: a token near a top-k tie may switch experts, hence the looser bound on the maximum)
    assert (got - ref).abs().mean() < 0.01 * ref.std() and (got - ref).abs().max() < 0.1 * ref.std()
