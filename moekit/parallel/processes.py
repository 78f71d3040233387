"""Local multi-process launch with torchrun's environment: fails fast, never hangs.

See the package docstring (``moekit/parallel/__init__.py``) for the design.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moekit.layer.moe import MoEStats
from moekit.parallel.context import teardown_parallel


# ---------------------------------------------------------------------------------------------- launch
def _worker(rank: int, nproc: int, port: int, fn: Callable, args: tuple, outdir: str, threads: int | None) -> None:
    # torchrun's environment; the rendezvous store is the launcher's (torchrun's "agent store"), so no
    # process has to bind a port that another program could have taken since it was chosen
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    if threads:
        torch.set_num_threads(threads)
    try:
        result = fn(*args)
        torch.save(result, Path(outdir) / f"rank{rank}.pt")
    except BaseException:
        (Path(outdir) / f"rank{rank}.err").write_text(traceback.format_exc())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # no teardown: it could block on a peer that is stuck or gone
    teardown_parallel()


def launch(fn: Callable, nproc: int, args: Iterable = (), *, timeout: float | None = None,
           threads: int | None = None) -> list[Any]:
    """Run ``fn(*args)`` in ``nproc`` fresh local processes, like torchrun; return each rank's result.

    ``fn`` (a module-level function) typically calls ``setup_parallel``; it returns plain containers of
    tensors, numbers and strings (loaded back with ``weights_only=True``). The environment is torchrun's
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT of a store this process hosts). ``threads``: torch
    threads per process (default: the machine's cores / nproc). If a rank fails, the others are killed
    and its traceback is raised as RuntimeError; past ``timeout`` seconds all are killed (TimeoutError).
    """
    import torch.multiprocessing as mp

    if nproc < 1:
        raise ValueError(f"nproc: must be >= 1, got {nproc}")
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    spawn = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="moekit-launch-") as outdir:
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # port 0: the OS picks
        port = store.port
        procs = [spawn.Process(target=_worker, args=(r, nproc, port, fn, tuple(args), outdir, threads), daemon=True)
                 for r in range(nproc)]
        for p in procs:
            p.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        failed: int | None = None
        try:
            while any(p.is_alive() for p in procs):
                failed = next((r for r, p in enumerate(procs) if p.exitcode not in (None, 0)), None)
                if failed is not None:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"launch: {nproc} processes did not finish within {timeout} s; killed them")
                time.sleep(0.05)
            failed = next((r for r, p in enumerate(procs) if p.exitcode not in (None, 0)), failed)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(5)
        if failed is not None:
            errs = sorted(Path(outdir).glob("rank*.err"))
            detail = "\n".join(f"--- {e.stem}\n{e.read_text()}" for e in errs) or f"exit code {procs[failed].exitcode}"
            raise RuntimeError(f"launch: rank {failed} of {nproc} failed\n{detail}")
        # results are plain containers of tensors and numbers (and MoEStats): no arbitrary unpickling
        with torch.serialization.safe_globals([MoEStats]):
            return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


