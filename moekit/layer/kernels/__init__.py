"""Kernels of the MoE layer, kept apart from the math they speed up (``moekit/layer/ffn.py`` is that math):

    inductor.py        InductorFn: a function compiled once per input signature, called without TorchDynamo
    threads.py         the expert worker threads (experts side by side, one intra-op thread each)
    scratch.py         reused CPU scratch buffers
    sorted_rows.py     the experts on sorted rows: one autograd Function, hand-written backward, loop/grouped
    grouped.py         grouped_mm and its capability check
    custom_op.py       moekit::experts_ffn, the experts as one opaque op for torch.compile
    select.py          select_backend: which kernel runs a call (device, dtype, size, host)
    decode.py          few-token inference: the chosen experts' weights read once; route + experts in one call
    matvec.py          hand-written C++ few-row products over bf16/fp32 weights (moekit::rows_matvec, experts_matvec)
    rows.py            gather before and combine after the experts, with their backward and compiled passes
    compiled_layer.py  the MoE layer's forward through torch.compile (backend "compiled", auto training)

Imports: ``moekit.host``, ``moekit.layer.ffn`` and ``moekit.layer.router``; never the modules that use them
(``experts``, ``dispatch``, ``moe``).
"""
