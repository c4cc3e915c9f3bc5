"""Multi-process test harness: run a function on a gloo process group of ``world`` CPU processes.

``run_world(fn, world, *args)`` starts ``world`` processes (torch.multiprocessing, forkserver), initialises
``torch.distributed`` with the gloo backend through a rendezvous file in a fresh temporary directory (no ports to
collide across parallel test runs), calls ``fn(rank, world, *args)`` in each and returns the list of the ranks'
return values (anything torch.save can write). An exception on any rank fails the call with that rank's traceback.
Each rank runs with one intra-op thread: the CI machine has two cores. ``fn`` must be importable (a module-level
function of a test module).
"""

import multiprocessing
import os
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60  # collective timeout: a hang fails the test instead of blocking CI


def _entry(rank, world, init_file, out_dir, fn, args):
    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=TIMEOUT_S))
        try:
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": True, "value": result}, path)
    except BaseException:  # noqa: BLE001 - reported to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise


def run_world(fn, world: int, *args):
    # forkserver with torch and the package preloaded: a rank forks from a process that has imported them once
    # (measured: a 4-rank world 35 s -> 11 s on the 2-core CI machine; spawn pays ~5 s of imports per rank)
    multiprocessing.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed", "sapsel_kernels",
                                            "sapsel_kernels.curvature.hessian", "sapsel_kernels.update.optim"])
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        try:
            mp.start_processes(_entry, args=(world, init_file, tmp, fn, args), nprocs=world, join=True,
                               start_method="forkserver")
        except mp.ProcessRaisedException:
            pass  # the rank's own traceback is in its result file
        results = []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} of {world} died without a result")
            d = torch.load(path, weights_only=False)
            if not d["ok"]:
                raise RuntimeError(f"rank {r} of {world} failed:\n{d['error']}")
            results.append(d["value"])
        return results
