"""Who does what when a study or a calibration runs in several processes.

Under `torchrun` (WORLD_SIZE, RANK, LOCAL_RANK set) each process takes one device and a share of
the work that is a pure function of the plan: the reference groups (model, seed, condition) are
dealt out in plan order, so a rerun with the same process count gives every process the same
share, and a cell is run once. With `context_parallel` in the spec the processes form a
(data x context) mesh: each context group splits every generation of its share over its
processes (diffusers' context parallelism), and only its first process writes results.

One process alone does everything, opens no process group and pays no collective.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from cachekit.errors import CachekitError
from cachekit.schemas.study import ContextParallel, Generation

T = TypeVar("T")


class WorkersError(CachekitError, RuntimeError):
    """Processes that cannot share a study as launched (a count that does not fit the spec)."""


@dataclass(frozen=True)
class Workers:
    rank: int  # among all processes
    size: int  # how many processes
    context: ContextParallel | None
    everyone: Any = None  # a gloo group of all processes (None alone)
    peers: Any = None  # a gloo group of this process's context group (None without context parallelism)
    mesh: Any = None  # the (data, ring, ulysses) device mesh, with context parallelism
    owns_process_group: bool = False  # whether leaving tears down the process group it opened
    cuda: bool = False

    @property
    def degree(self) -> int:
        """Processes per generation."""
        return self.context.degree if self.context else 1

    @property
    def data_rank(self) -> int:
        return self.rank // self.degree

    @property
    def data_size(self) -> int:
        return self.size // self.degree

    @property
    def writes(self) -> bool:
        """Whether this process records results: the first of its context group."""
        return self.rank % self.degree == 0

    @property
    def alone(self) -> bool:
        return self.size == 1

    @property
    def name(self) -> str:
        """Which process this is, for the results: rank, count, device, host."""
        device = f"cuda:{torch.cuda.current_device()}" if self.cuda else "cpu"
        return f"rank {self.rank} of {self.size} ({device} on {socket.gethostname()})"

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's context group's share of `items`, dealt out in order."""
        return list(items[self.data_rank :: self.data_size])

    def agree(self, value: T) -> T:
        """The first process of the context group's `value`, on every process of the group: what the
        group does next must not depend on what each process happened to read."""
        if self.peers is None:
            return value
        box = [value]
        dist.broadcast_object_list(box, group_src=0, group=self.peers)
        return box[0]

    def context_sum(self, values: list[float]) -> list[float]:
        """`values` summed over the context group: what the whole of a split generation measures."""
        if self.peers is None:
            return values
        total = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(total, group=self.peers)
        return total.tolist()

    def gather(self, value: T) -> list[T]:
        """Every process's `value`, in rank order, on every process."""
        if self.everyone is None:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value, group=self.everyone)
        return values

    def wait_for_all(self) -> None:
        if self.everyone is not None:
            dist.barrier(group=self.everyone)

    def parallelize(self, transformer: torch.nn.Module) -> None:
        """Split the transformer's generations over the context group, if the spec asks for it."""
        if self.context is None:
            return
        from diffusers import ContextParallelConfig, ModelMixin

        if not isinstance(transformer, ModelMixin) or not transformer._cp_plan:
            raise WorkersError(
                f"context_parallel: {type(transformer).__name__} has no context-parallel plan in diffusers; "
                "leave context_parallel unset for it"
            )
        config = ContextParallelConfig(
            ulysses_degree=self.context.ulysses, ring_degree=self.context.ring, mesh=self.mesh
        )
        transformer.enable_parallelism(config=config)

    def leave(self) -> None:
        if self.owns_process_group:
            dist.destroy_process_group()


def join(spec: Generation) -> Workers:
    """This process's place among the processes `torchrun` started (or alone)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    context = spec.context_parallel
    degree = context.degree if context else 1
    if size == 1:
        if context is not None:
            raise WorkersError(
                f"context_parallel needs {degree} processes per generation: run under "
                f"`torchrun --nproc-per-node {degree}` (or a multiple of it)"
            )
        return Workers(0, 1, None, cuda=spec.device == "cuda")
    if size % degree:
        raise WorkersError(
            f"context_parallel splits each generation over {degree} processes, which does not divide the "
            f"{size} started: start a multiple of {degree} (torchrun --nproc-per-node)"
        )
    rank = int(os.environ["RANK"])
    owns = not dist.is_initialized()
    if spec.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    if owns:
        dist.init_process_group("cpu:gloo,cuda:nccl" if spec.device == "cuda" else "gloo")
    everyone = dist.new_group(backend="gloo")
    peers = mesh = None
    if context is not None:
        groups = [list(range(first, first + degree)) for first in range(0, size, degree)]
        for ranks in groups:  # every process makes every group, in the same order
            group = dist.new_group(ranks, backend="gloo")
            if rank in ranks:
                peers = group
        mesh = torch.distributed.device_mesh.init_device_mesh(
            spec.device,
            (size // degree, context.ring, context.ulysses),
            mesh_dim_names=("data", "ring", "ulysses"),
        )
    return Workers(rank, size, context, everyone, peers, mesh, owns, spec.device == "cuda")


def use_threads(spec: Generation, models: list[str]) -> int:
    """Set the CPU threads torch computes with for `models` under `spec` (see `Generation.threads`);
    returns the count."""
    from cachekit import testbed

    threads = spec.threads
    if threads is None and all(model in testbed.names() for model in models):
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
