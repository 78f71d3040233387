"""Small functions compiled by TorchInductor and called without TorchDynamo (the decode and combine kernels).

A decode step reads a few MiB of weights per layer in a few hundred microseconds, so fixed costs per call
count. ``torch.compile`` puts ~20-25 us of Python around each call in torch 2.13 (frame evaluation, six
nested wrappers, config patches; measured with a 16x16 problem: 31 us through torch.compile, 8-12 us for
the same inductor kernel called directly). ``InductorFn`` traces the function once per *signature* with
symbolic shapes (``make_fx``, no duck sizing, so every size is its own symbol), compiles the graph with
inductor and calls the result directly. The training path uses it too, inside its autograd Functions, for
memory-bound steps that are several eager passes over [T*K, D] (``moe.combine`` and its backward,
``rows.sum_rows_per_token``): the kernels take no part in autograd, their callers hold the backward.

  signature  the dtype, contiguity and which sizes are 1 of each tensor argument (0/1 sizes are specialised
             while tracing), which arguments are None, the constant (non-tensor) arguments, and the sizes of
             the dims the caller keeps static (``static_dims``: inductor plans its loops with the real size).
  safety     each kernel keeps its trace's shape guards, what tracing assumed about the sizes: relations
             between them, and facts about sizes derived from them that the signature cannot see (T = A // K
             == 1 in ``rows._combine_kernel``). It runs only where they hold (checked once per exact layout);
             elsewhere another kernel is built for the same signature (a kernel traced at T = 1 is never used
             for T = 3), and inputs the function itself refuses (wrong shapes) raise there. The compiled code
             also asserts its inputs' sizes and strides against the traced symbols.

Where inductor cannot build (no C++ compiler, an unsupported op) the first failure warns once and the
function returns None from then on: the callers run their eager path. Called while TorchDynamo traces (the MoE
layer through torch.compile) it returns None too: the eager ops join that graph and inductor fuses them there
(calling a kernel from inside the graph would break it in two at the kernel's lock). ``MOEKIT_KERNELS=eager``
(or its older name ``MOEKIT_DECODE_KERNEL=eager``) selects the eager paths from the start.
"""

from __future__ import annotations

import builtins
import functools
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger("moekit")


@functools.cache
def _guard_globals() -> dict[str, Any]:
    """The names the shape guards' expressions use (sympy's functions as torch evaluates them)."""
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

    return SYMPY_INTERP


def kernels_turned_off(*, decode_alias: bool = False) -> bool:
    """``MOEKIT_KERNELS=eager``: the compiled kernels and the compiled training layer are off (the kernels also
    honour the switch's older name, ``MOEKIT_DECODE_KERNEL=eager``)."""
    names = ("MOEKIT_KERNELS", "MOEKIT_DECODE_KERNEL") if decode_alias else ("MOEKIT_KERNELS",)
    return any(os.environ.get(n) == "eager" for n in names)


def accumulate_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the kernels accumulate in: fp32 for bf16/fp16/fp32 operands, float64 when one is float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class InductorFn:
    """``fn(*tensors, *consts)`` compiled per signature; ``__call__`` returns None when it cannot run."""

    def __init__(self, fn: Callable[..., Tensor], name: str, static_dims: dict[int, tuple[int, ...]] | None = None):
        self.fn, self.name = fn, name
        # {argument position: dims kept static (their sizes join the signature)}
        self.static_dims = static_dims or {}
        self.enabled = not kernels_turned_off(decode_alias=True)
        # signature -> the kernels built for it, each with its shape guards (a code object, None: no guards)
        self._compiled: dict[tuple, list[tuple[Any, Callable[..., Tensor]]]] = {}
        # the kernel chosen for each exact layout (dtypes, sizes, strides) seen: the guards, which read only
        # those, are evaluated once per layout (~20 us for the routed decode kernel's), not once per call
        self._by_layout: dict[tuple, Callable[..., Tensor]] = {}
        self._lock = threading.Lock()

    def __call__(self, tensors: tuple[Tensor | None, ...], consts: tuple = ()) -> Tensor | None:
        if not self.enabled or torch.compiler.is_compiling():  # in a torch.compile graph inductor fuses the eager ops
            return None
        layout = (consts, tuple(None if t is None else (t.dtype, t.shape, t.stride()) for t in tensors))
        present = [t for t in tensors if t is not None]
        compiled = self._by_layout.get(layout)
        if compiled is None:
            key = (consts, tuple(None if t is None else (t.dtype, t.is_contiguous(), *(s == 1 for s in t.shape))
                                 for t in tensors),
                   tuple(tensors[i].shape[d] for i, dims in self.static_dims.items() for d in dims))
            compiled = self._select(self._compiled.get(key, ()), present) or self._build(key, tensors, consts)
            if compiled is None:
                return None
            self._by_layout[layout] = compiled
        return compiled(*present)

    def clear(self) -> None:
        """Forget every kernel built (the next call of each signature builds again)."""
        with self._lock:
            self._compiled.clear()
            self._by_layout.clear()

    @staticmethod
    def _select(kernels, present: list[Tensor]) -> Callable[..., Tensor] | None:
        """The first kernel whose shape guards hold for these inputs (most signatures have one, unguarded)."""
        for guards, compiled in kernels:
            if guards is None or eval(guards, _guard_globals(), {"L": {f"t{i}": t for i, t in enumerate(present)}}):
                return compiled
        return None

    def _build(self, key: tuple, tensors: tuple[Tensor | None, ...], consts: tuple) -> Callable[..., Tensor] | None:
        import torch._inductor
        from torch.fx.experimental.proxy_tensor import make_fx

        where = [t is not None for t in tensors]

        def graph_fn(*present: Tensor) -> Tensor:
            it = iter(present)
            return self.fn(*[next(it) if p else None for p in where], *consts)

        present = [t for t in tensors if t is not None]
        with self._lock:
            kernels = self._compiled.setdefault(key, [])
            compiled = self._select(kernels, present)  # (another thread may have built it meanwhile)
            if compiled is not None:
                return compiled
            try:
                log.info("%s: compiling with TorchInductor for a new input signature (a few seconds)", self.name)
                # traced without autocast: the function states its dtypes (autocast would rewrite them)
                device = present[0].device.type
                fakes = self._fakes(tensors)
                # (inductor traces the graph again: under autocast that trace would insert the casts)
                with torch.no_grad(), torch.autocast(device, enabled=False):
                    gm = make_fx(graph_fn, tracing_mode="symbolic")(*fakes)
                    example = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
                    compiled = torch._inductor.compile(gm, example)
                # what the trace assumed about the sizes, as one expression over the inputs (t0, t1, ...)
                code = fakes[0].fake_mode.shape_env.produce_guards_expression(fakes)
                guards = None if code is None else builtins.compile(code, f"<{self.name} guards>", "eval")
            except Exception as e:  # noqa: BLE001 (any build failure: the eager path from now on)
                if kernels:  # this signature built before: these inputs break what those traces checked (wrong
                    raise    # shapes for the function, as the eager function would refuse them too)
                first = str(e).splitlines()[0] if str(e) else ""
                log.warning("%s: TorchInductor could not build the kernel (%s: %s); using the eager path",
                            self.name, type(e).__name__, first)
                self.enabled = False
                return None
            kernels.append((guards, compiled))
            return compiled

    def _fakes(self, tensors: tuple[Tensor | None, ...]) -> list[Tensor]:
        """Fake inputs with a symbol for every size (no duck sizing: equal sizes do not tie), except the
        static dims and sizes 0 and 1 (the shape environment specialises those)."""
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

        mode = FakeTensorMode(shape_env=ShapeEnv(duck_shape=False))
        fakes = []
        for i, t in enumerate(tensors):
            if t is None:
                continue
            static = self.static_dims.get(i, ())
            dims = [DimDynamic.STATIC if d in static else DimDynamic.DYNAMIC for d in range(t.dim())]
            fakes.append(mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(
                dynamic_sizes=dims, constraint_sizes=[None] * t.dim())))
        return fakes
