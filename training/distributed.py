"""Training in several processes with PyTorch's DistributedDataParallel (gloo on CPU, NCCL with a GPU
per process): the group, its processes, and the few messages the training loop needs.

The process that calls ``persona train --nproc N`` is rank 0: it keeps its data and its validation
(which reads the feature store), starts ranks 1..N-1 with the model's weights and the training
tensors, and decides for all after each epoch (a better score, stop). Every rank takes its share of
each batch; DDP averages the gradients, so N processes take the steps one process would.

Across machines (pods), a launcher starts the processes instead: ``torchrun`` sets ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each (``launched``), every process runs the same
``persona train --training-set DIR`` over shards all of them can read, and joins the group through
that environment (``join_launched``). Rank 0 still decides and saves the model.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

T = TypeVar("T")
WAIT = timedelta(hours=2)  # the longest one rank waits for another: rank 0's validation of an epoch included


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Each rank's device: its own GPU (NCCL needs one per process), or the CPU. Under a launcher the
    GPU is the one of its machine (``LOCAL_RANK``)."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) if launched() else rank)


def check_devices(device: torch.device, world: int) -> None:
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"--nproc {world} on CUDA needs a GPU per process; this machine has "
                         f"{torch.cuda.device_count()}")


def threads_per_rank(world: int) -> int:
    """CPU threads for each rank's torch: the machine's cores shared out, so ranks do not oversubscribe."""
    return max(1, (os.cpu_count() or 1) // world)


@dataclass
class Group:
    """This process's place in the group and the messages the loop exchanges."""

    rank: int
    world: int

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module under DDP (gradients averaged over the ranks in backward)."""
        device = next(module.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True,
                                                   broadcast_buffers=False)  # no batch statistics to share

    def decide(self, *flags: bool) -> list[bool]:
        """Rank 0's flags, on every rank."""
        message = torch.tensor([float(f) for f in flags])
        dist.broadcast(message, src=0)
        return [bool(v) for v in message.tolist()]

    def total(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks."""
        message = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(message)
        return message.tolist()


def join(rank: int, world: int, port: int, device: torch.device) -> Group:
    """Join the group as ``rank`` (rank 0 waits for the others)."""
    torch.set_num_threads(threads_per_rank(world))
    if device.type == "cuda":
        torch.cuda.set_device(rank_device(device, rank))
    dist.init_process_group(backend(device), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=WAIT)
    return Group(rank, world)


def launched() -> tuple[int, int] | None:
    """(rank, world) when a launcher such as ``torchrun`` started this process as one of several; else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the processes with torchrun")
    return int(os.environ["RANK"]), world


def join_launched(device: torch.device) -> Group:
    """Join the launcher's group (``env://``), each process on its machine's share of the cores and, with
    GPUs, on its own (``LOCAL_RANK``)."""
    rank, world = launched() or (0, 1)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    torch.set_num_threads(threads_per_rank(local_world))
    if device.type == "cuda":
        torch.cuda.set_device(rank_device(device, rank))
    dist.init_process_group(backend(device), init_method="env://", rank=rank, world_size=world, timeout=WAIT)
    return Group(rank, world)


def gathered(value: T) -> list[T]:
    """Every rank's ``value`` (a small picklable object), in rank order, on every rank."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def start(world: int, device: torch.device, worker: Callable, *args) -> tuple[list, int]:
    """Start ranks 1..world-1 as fresh processes running ``worker(rank, world, port, *args)`` (tensors in
    ``args`` travel through shared memory); returns them and the group's port for rank 0 to join."""
    check_devices(device, world)
    port = free_port()
    context = mp.get_context("spawn")
    processes = [context.Process(target=worker, args=(rank, world, port, *args), daemon=True)
                 for rank in range(1, world)]
    for p in processes:
        p.start()
    return processes, port


def wait(processes: list, timeout: float = 600.0) -> None:
    """Wait for the other ranks; one that failed makes the run fail, not hang."""
    for p in processes:
        p.join(timeout)
        if p.is_alive():
            p.terminate()
            raise RuntimeError(f"training rank {processes.index(p) + 1} did not finish")
        if p.exitcode:
            raise RuntimeError(f"training rank {processes.index(p) + 1} failed (exit code {p.exitcode})")


def lead(world: int, device: torch.device, worker: Callable, args: tuple, loop: Callable[[Group], T]) -> T:
    """Rank 0's part of a group: start ranks 1..world-1 (``worker(rank, world, port, *args)``), run ``loop``
    in the group, and leave it with this process's thread count restored. A failure here stops the others
    (they would wait for rank 0 until the group's timeout); one of theirs fails the run."""
    threads = torch.get_num_threads()
    processes, port = start(world, device, worker, *args)
    try:
        result = loop(join(0, world, port, device))
    except BaseException:
        for p in processes:
            p.terminate()
        raise
    finally:
        leave()
        torch.set_num_threads(threads)
    wait(processes)
    return result
