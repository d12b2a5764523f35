"""Multi-process and multi-node training and inference on ``torch.distributed``.

Run any script (or ``python -m dgdlens train ...``) under ``torchrun``; :meth:`DGD.train`,
:meth:`DGD.get_latent_representation` and :meth:`DGD.save` notice the launcher's environment
(``WORLD_SIZE > 1``) and join the process group by themselves (``gloo`` on CPU, ``nccl`` on GPUs).

How the work is split:

- Decoder, likelihood and mixture prior are **replicated**: every process holds the same weights
  (broadcast from rank 0 at the start) and, after every mini-batch, the gradients of these shared
  parameters are **summed** across processes with one ``all_reduce``. The loss is a sum over cells,
  so the summed gradient of ``P`` local batches of ``B/P`` cells is the gradient of one global batch
  of ``B`` cells: ``batch_size`` is the *global* batch size, and every process takes the same
  number of steps per epoch (``ceil(n_train / batch_size)``).
- The **representation table is sharded by cell**: rank ``r`` owns a contiguous slice of the
  training (and validation) cells, their latent vectors and their optimiser state, and only ever
  reads those cells from the data (a contiguous region of a backed file). Per-process memory for
  the table falls as processes are added.
- Per-epoch statistics (losses, cell counts) are summed across processes and then broadcast from
  rank 0, so every process sees bit-identical numbers and takes the same early-stopping,
  learning-rate and checkpoint decisions.
- Checkpoints are sharded: each process writes ``<checkpoint_path>.rank<r>-of-<P>`` at the same
  epoch; resuming needs the same number of processes and checks that all shards are from the
  same epoch.
- At the end every process gathers the shards (``all_gather``), so the model object is complete
  everywhere; :meth:`DGD.save` writes one directory from rank 0 only, which loads with
  :meth:`DGD.load` in a single process.
- Held-out inference (:func:`infer_latents_sharded`) gives each process a contiguous slice of the
  new cells and gathers the latents.

Everything goes through ``torch.distributed`` collectives; there are no hand-written sockets,
process pools or parameter servers.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .data.loader import BatchLoader
from .models._engine import Trainer, TrainConfig, infer_latents, resolve_device
from .nn.representation import RepresentationTable

__all__ = [
    "init", "is_distributed", "rank", "world_size", "local_rank", "is_main_process", "barrier",
    "shard_bounds", "local_device", "all_reduce_sum", "gather_rows", "run_on_main",
    "DistributedTrainer", "train_distributed", "infer_latents_sharded", "checkpoint_shard_path",
]


# ---------------------------------------------------------------------------------------------------
# process group
# ---------------------------------------------------------------------------------------------------

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

def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, then rank 0's result for everybody (bit-identical on every rank)."""
    if not is_distributed():
        return tensor
    init()
    out = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    dist.broadcast(out, src=0)
    return out.to(tensor.device)


def _all_agree(values: list[int], what: str) -> None:
    """Raise on every rank if the integers differ between ranks."""
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
        sizes = [shard_bounds(n_total, size, r)[1] - shard_bounds(n_total, size, r)[0] for r in range(size)]
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


# ---------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------

#: most latents the distributed EM refit of the mixture uses (a seeded sample across all processes)
REFIT_SAMPLE = 100_000


class DistributedTrainer(Trainer):
    """The engine's :class:`Trainer` with shared-parameter gradients summed across processes.

    One flat ``all_reduce`` per mini-batch over the decoder, likelihood and prior gradients; the
    representation table is local (each rank owns its cells), so it needs no communication.
    ``comm_s`` accumulates the time spent in those all-reduces.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("reducer", all_reduce_sum)
        super().__init__(*args, **kwargs)
        self.comm_s = 0.0
        self._shared = [p for p in self.module.parameters() if p.requires_grad]

    def _sync_gradients(self) -> None:
        params = self._shared
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        t0 = time.perf_counter()
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g)
            offset += n
        self.comm_s += time.perf_counter() - t0

    def _refit_prior(self) -> None:
        """The engine's EM refit of the mixture, on latents from every process: a seeded sample of at
        most ``REFIT_SAMPLE`` cells in all (EM on millions of latents would cost minutes and GBs for no
        better fit), gathered, fitted on rank 0 and broadcast."""
        cfg, prior = self.cfg, self.module.prior
        if not hasattr(prior, "fit_to"):
            return
        size = world_size()
        shard_sizes = [shard_bounds(self.n_train, size, r)[1] - shard_bounds(self.n_train, size, r)[0]
                       for r in range(size)]
        takes = [min(n, math.ceil(REFIT_SAMPLE / size)) for n in shard_sizes]
        z = self.train_table.z.detach()
        pick = np.sort(np.random.default_rng([cfg.seed, rank()]).choice(len(z), takes[rank()], replace=False))
        sample = gather_rows(z[torch.from_numpy(pick).to(z.device)], sum(takes), sizes=takes)
        if rank() == 0:
            prior.fit_to(sample, seed=cfg.seed)
        self._broadcast_prior()

    def _broadcast_prior(self) -> None:
        # rank 0's fit wins so that all replicas agree
        for p in self.module.prior.parameters():
            if p.device == _comm_device():
                dist.broadcast(p.data, src=0)
            else:
                _broadcast_via(p.data)


def checkpoint_shard_path(path, shard: int | None = None, n_shards: int | None = None) -> str:
    """Each process's own checkpoint file: ``<path>.rank<r>-of-<P>``."""
    shard = rank() if shard is None else shard
    n_shards = world_size() if n_shards is None else n_shards
    return f"{path}.rank{shard}-of-{n_shards}"


def _shard_table(table: RepresentationTable | None, lo: int, hi: int, dev) -> RepresentationTable | None:
    if table is None:
        return None
    return RepresentationTable(hi - lo, table.dim, init=table.z.detach()[lo:hi].cpu()).to(dev)


def _shard_loader(model, rows: np.ndarray, cfg: TrainConfig, dev, *, seed, batch_size: int,
                  n_batches: int | None) -> BatchLoader:
    lib = model.library_size
    return BatchLoader(model._matrix, rows, None if lib is None else lib[rows], batch_size=batch_size,
                       shuffle=True, seed=seed, device=dev, block_size=getattr(cfg, "shuffle_block_size", None),
                       n_batches=n_batches)


def train_distributed(model, cfg: TrainConfig, device="auto", resume_from=None, *,
                      max_batches: int | None = None) -> DistributedTrainer:
    """Train a :class:`~dgdlens.models.dgd.DGD` on all processes of the group (called by ``DGD.train``).

    Every process must have built the model from the same data with the same seed (checked).
    Returns this rank's trainer; the model's representation tables are complete on every rank.
    ``max_batches`` cuts every epoch short (benchmarks).
    """
    init(device=device)
    dev = local_device(device)
    size, me = world_size(), rank()
    n_train, n_val = len(model.train_idx), len(model.val_idx)
    checksum = int(np.sum(model.train_idx[: 1 << 20] % 1_000_003))
    _all_agree([model._matrix.n_obs, model._matrix.n_vars, n_train, n_val, model.params["seed"], checksum,
                cfg.batch_size, cfg.max_epochs], "the data, split or training settings")
    if cfg.batch_size < size or n_train < size:
        raise ValueError(f"batch_size ({cfg.batch_size}) and the number of training cells ({n_train}) must be at "
                         f"least the number of processes ({size}); batch_size is the global batch size.")

    model.module.to(dev)
    with torch.no_grad():
        for tensor in model.module.state_dict().values():
            if tensor.device == _comm_device():
                dist.broadcast(tensor, src=0)
            else:
                _broadcast_via(tensor)

    tr_lo, tr_hi = shard_bounds(n_train)
    va_lo, va_hi = shard_bounds(n_val)
    train_table = _shard_table(model.train_rep, tr_lo, tr_hi, dev)
    val_table = _shard_table(model.val_rep, va_lo, va_hi, dev) if n_val >= size else None
    # the full tables are rebuilt from the shards at the end; holding them meanwhile would undo the sharding
    model.train_rep = model.val_rep = None
    n_batches = max(1, math.ceil(n_train / cfg.batch_size))
    local_batch = max(1, math.ceil(cfg.batch_size / size))
    train_loader = _shard_loader(model, model.train_idx[tr_lo:tr_hi], cfg, dev, seed=[cfg.seed, me],
                                 batch_size=local_batch, n_batches=min(n_batches, n_train // size))
    train_loader.max_batches = max_batches
    val_loader = None
    if val_table is not None:
        val_loader = _shard_loader(model, model.val_idx[va_lo:va_hi], cfg, dev, seed=[cfg.seed + 1, me],
                                   batch_size=local_batch, n_batches=None)
    local_cfg = dataclasses.replace(
        cfg, progress=cfg.progress and me == 0,
        checkpoint_path=None if cfg.checkpoint_path is None else checkpoint_shard_path(cfg.checkpoint_path))
    _all_agree([len(train_loader)], "the number of mini-batches per epoch")
    trainer = DistributedTrainer(model.module, train_loader, val_loader, train_table, val_table, local_cfg, dev)
    if resume_from is not None:
        shard_file = checkpoint_shard_path(resume_from)
        if not os.path.exists(shard_file):
            raise FileNotFoundError(f"No checkpoint shard {shard_file}: resume with the same number of processes "
                                    f"({size}) and the checkpoint_path used for the run.")
        trainer.load_checkpoint(shard_file)
        _all_agree([trainer.epoch], "the epoch of their checkpoint shards (resume from a complete checkpoint)")
    trainer.fit(is_main=True)  # every rank writes its own checkpoint shard; progress only on rank 0

    model.train_rep = RepresentationTable(n_train, model.n_latent, init=gather_rows(train_table.z.detach(), n_train).cpu()).to(dev)
    if n_val:
        full_val = (gather_rows(val_table.z.detach(), n_val).cpu() if val_table is not None
                    else torch.zeros(n_val, model.n_latent))
        model.val_rep = RepresentationTable(n_val, model.n_latent, init=full_val).to(dev)
    model.device = dev
    return trainer


def _broadcast_via(tensor: torch.Tensor) -> None:
    """Broadcast a tensor that lives off the communication device (e.g. CPU buffer with nccl)."""
    staged = tensor.detach().to(_comm_device(), copy=True)
    dist.broadcast(staged, src=0)
    tensor.copy_(staged.to(tensor.device))


# ---------------------------------------------------------------------------------------------------
# held-out inference
# ---------------------------------------------------------------------------------------------------

def infer_latents_sharded(module, matrix, scale: np.ndarray | None, n_latent: int, *, batch_size: int,
                          device, progress: bool = True, **infer_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~dgdlens.models._engine.infer_latents` for every row of ``matrix``; under several
    processes each embeds a contiguous slice of the cells and the results are gathered."""
    if not is_distributed():
        loader = BatchLoader(matrix, None, scale, batch_size=batch_size, shuffle=False, device=device)
        return infer_latents(module, loader, n_latent, progress=progress, device=device, **infer_kwargs)
    init(device=device)
    lo, hi = shard_bounds(matrix.n_obs)
    rows = np.arange(lo, hi)
    loader = BatchLoader(matrix, rows, None if scale is None else scale[lo:hi], batch_size=batch_size,
                         shuffle=False, device=device)
    z, loss = infer_latents(module, loader, n_latent, progress=progress and rank() == 0, device=device,
                            **infer_kwargs)
    z = gather_rows(torch.from_numpy(z), matrix.n_obs).numpy()
    loss = gather_rows(torch.from_numpy(loss), matrix.n_obs).numpy()
    return z, loss
