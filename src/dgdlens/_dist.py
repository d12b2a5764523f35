"""Process-group helpers and collectives on ``torch.distributed``: the bottom layer of distributed work.

Nothing here knows about models. Run any script (or ``dgdlens train ...``) under ``torchrun``; the
training runner (:mod:`dgdlens.train`) notices the launcher's environment (``WORLD_SIZE > 1``) and joins
the process group by itself (``gloo`` on CPU, ``nccl`` on GPUs). Every collective here is bit-identical
on every rank (a sum is broadcast from rank 0 afterwards), so all processes take the same decisions.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from ._device import resolve_device

__all__ = [
    "init", "is_distributed", "rank", "world_size", "local_rank", "is_main_process", "barrier",
    "shard_bounds", "shard_sizes", "local_device", "all_reduce_sum", "all_reduce_max", "all_agree", "gather_rows", "run_on_main",
    "broadcast_tensor", "broadcast_module", "all_reduce_gradients", "shard_file",
]


def _launched() -> bool:
    """True inside a multi-process launch (torchrun sets WORLD_SIZE, RANK, MASTER_ADDR, ...)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """Whether this process is one of several (an initialised group, or a torchrun launch)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return _launched()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 (or a plain single process): the one that writes files and prints."""
    return rank() == 0


def init(backend: str | None = None, device: str | torch.device | None = "auto",
         timeout_s: float = 1800) -> None:
    """Join the process group set up by the launcher (``torchrun``'s ``env://`` rendezvous).

    Does nothing in a single process or when the group already exists. ``backend=None`` picks
    ``nccl`` when ``device`` resolves to CUDA, else ``gloo``.
    """
    if not dist.is_available():
        raise RuntimeError("This torch build has no torch.distributed; install a standard torch wheel.")
    if dist.is_initialized() or not _launched():
        return
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"WORLD_SIZE is set but {var} is not: launch with torchrun "
                               "(e.g. torchrun --nproc_per_node=2 script.py), which sets all of them.")
    if backend is None:
        backend = "nccl" if resolve_device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    # the group dgdlens made is taken down before the interpreter tears down torch: a group left to the
    # destructors at exit can abort the process (seen once as SIGABRT of a 2-process gloo test)
    atexit.register(_destroy_at_exit)


def _destroy_at_exit() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        init()
        dist.barrier()


def local_device(device: str | torch.device | None = "auto") -> torch.device:
    """The device of this process: ``"auto"``/``"cuda"`` mean this process's own GPU (``LOCAL_RANK``)."""
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and is_distributed():
        dev = torch.device("cuda", local_rank())
    return dev


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_bounds(n: int, n_shards: int | None = None, shard: int | None = None) -> tuple[int, int]:
    """``[start, stop)`` of ``shard``'s contiguous share of ``n`` items (sizes differ by at most one)."""
    n_shards = world_size() if n_shards is None else n_shards
    shard = rank() if shard is None else shard
    return n * shard // n_shards, n * (shard + 1) // n_shards


# ---------------------------------------------------------------------------------------------------
# collectives
# ---------------------------------------------------------------------------------------------------

def shard_sizes(n: int, n_shards: int | None = None) -> list[int]:
    """Every shard's number of items (see :func:`shard_bounds`)."""
    n_shards = world_size() if n_shards is None else n_shards
    return [shard_bounds(n, n_shards, r)[1] - shard_bounds(n, n_shards, r)[0] for r in range(n_shards)]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, then rank 0's result for everybody (bit-identical on every rank)."""
    if not is_distributed():
        return tensor
    init()
    out = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    dist.broadcast(out, src=0)
    return out.to(tensor.device)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over processes (the same on every rank)."""
    if not is_distributed():
        return tensor
    init()
    out = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.to(tensor.device)


def all_agree(values: list[int], what: str) -> None:
    """Raise on every rank if the integers differ between ranks (no-op in one process)."""
    if not is_distributed():
        return
    init()
    t = torch.tensor(values, dtype=torch.int64, device=_comm_device())
    lo, hi = t.clone(), t.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"The processes disagree on {what} (min {lo.tolist()}, max {hi.tolist()}); every "
                           "process must run the same script on the same data with the same settings.")


def gather_rows(local: torch.Tensor, n_total: int, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's contiguous shard (see :func:`shard_bounds`) into the full table,
    on every rank. ``sizes``: every rank's number of rows, when they are not the shard sizes."""
    if not is_distributed():
        return local
    init()
    size = world_size()
    if sizes is None:
        sizes = shard_sizes(n_total, size)
    if local.shape[0] != sizes[rank()]:
        raise ValueError(f"rank {rank()} holds {local.shape[0]} rows, expected {sizes[rank()]}")
    dev = _comm_device()
    padded = torch.zeros((max(sizes),) + tuple(local.shape[1:]), dtype=local.dtype, device=dev)
    padded[:local.shape[0]] = local.detach().to(dev)
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(local.device)


def run_on_main(fn, *args, **kwargs):
    """Run ``fn`` on rank 0 only (e.g. writing a file), then let every rank continue; an error on
    rank 0 is raised on every rank instead of leaving the others waiting."""
    if not is_distributed():
        return fn(*args, **kwargs)
    init()
    result, error = None, None
    if rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # re-raised below on rank 0, reported on the others
            error = err
    message = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise RuntimeError(f"rank 0 failed: {message[0]}")
    return result


def shard_file(path) -> str:
    """This process's own file for per-process state (checkpoint shards): ``<path>.rank<r>-of-<P>`` under
    several processes, ``path`` itself in one."""
    if not is_distributed():
        return str(path)
    return f"{path}.rank{rank()}-of-{world_size()}"


def broadcast_tensor(tensor: torch.Tensor, src: int = 0) -> None:
    """In place: every rank gets ``src``'s values (staged through the communication device if needed)."""
    if not is_distributed():
        return
    init()
    if tensor.device == _comm_device():
        dist.broadcast(tensor, src=src)
        return
    staged = tensor.detach().to(_comm_device(), copy=True)
    dist.broadcast(staged, src=src)
    with torch.no_grad():
        tensor.copy_(staged.to(tensor.device))


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank ``src``'s."""
    with torch.no_grad():
        for tensor in module.state_dict().values():
            broadcast_tensor(tensor, src)


def all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of shared (replicated) parameters across processes with one flat all-reduce."""
    if not is_distributed() or not params:
        return
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dev = flat.device
    if dev != _comm_device():
        flat = flat.to(_comm_device())
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.to(dev)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g)
        offset += n
