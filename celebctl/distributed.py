"""One process per GPU, as torchrun, ``accelerate launch`` and SLURM's ``srun`` start them.

celebctl schedules nothing itself: the launcher starts the processes and sets the usual
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; under
``srun`` without them, ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID`` stand in).
Each process takes a deterministic share of the work (:func:`shard`), runs on
``cuda:LOCAL_RANK``, and writes through the registry's writer lock. A small gloo process group
carries metadata only: the work list rank 0 decided on, progress counters in the group's
key-value store, and the rows of the final table.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from .errors import InvalidOption

T = TypeVar("T")
# A batch job can run for days; a collective that waits for the slowest rank must not time out.
GROUP_TIMEOUT = timedelta(days=7)
_PREFIX = "celebctl/"


@dataclass(frozen=True)
class Launch:
    """Where this process stands among the processes a launcher started."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """More than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 prints the progress view and the final table."""
        return self.rank == 0


def _whole(environ: Mapping[str, str], key: str) -> int | None:
    raw = environ.get(key)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise InvalidOption(f"{key}={raw!r} is not a whole number; the launcher sets it "
                            "(torchrun, accelerate launch or srun).") from None
    if value < 0:
        raise InvalidOption(f"{key}={value} is negative.")
    return value


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch:
    """Read this process's rank, the world size and the local rank from the launcher."""
    env = os.environ if environ is None else environ
    rank, world = _whole(env, "RANK"), _whole(env, "WORLD_SIZE")
    local = _whole(env, "LOCAL_RANK")
    if rank is None and world is None:
        rank, world = _whole(env, "SLURM_PROCID"), _whole(env, "SLURM_NTASKS")
        local = _whole(env, "SLURM_LOCALID")
        if world is not None and world > 1 and not env.get("MASTER_ADDR"):
            raise InvalidOption(
                "Started by srun with several tasks but MASTER_ADDR and MASTER_PORT are not "
                "set: export them (the first node's host name and a free port) so the "
                "processes can find each other.")
    if rank is None and world is None:
        return Launch()
    if rank is None or world is None:
        raise InvalidOption("RANK and WORLD_SIZE must be set together (the launcher sets both).")
    if world < 1 or rank >= world:
        raise InvalidOption(f"RANK={rank} does not fit WORLD_SIZE={world}.")
    return Launch(rank=rank, world_size=world, local_rank=local if local is not None else rank)


def shard(items: Sequence[T], launch: Launch) -> list[T]:
    """This process's share: every ``world_size``-th item, starting at its rank."""
    return list(items[launch.rank::launch.world_size])


def device_for(requested: str, launch: Launch) -> str:
    """The device this process uses: ``cuda:LOCAL_RANK`` when several processes share a
    machine's GPUs and the user asked for ``auto`` or plain ``cuda``; else what was asked."""
    if not launch.distributed or requested not in ("auto", "cuda"):
        return requested
    import torch

    if not torch.cuda.is_available():
        return requested
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        raise InvalidOption(
            f"LOCAL_RANK={launch.local_rank} but this machine has {count} GPU(s): start at most "
            f"{count} process(es) per machine (torchrun --nproc-per-node {count}).")
    return f"cuda:{launch.local_rank}"


class Group:
    """The metadata channel between the processes of one job (a no-op for one process).

    Use as a context manager: entering joins the gloo process group (when the launch is
    distributed), leaving destroys it.
    """

    def __init__(self, launch: Launch):
        self.launch = launch
        self._store: Any = None
        self._joined = False

    def __enter__(self) -> Group:
        if self.launch.distributed:
            import torch.distributed as dist

            if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
                raise InvalidOption("MASTER_ADDR and MASTER_PORT must be set for a job of "
                                    "several processes (torchrun sets them).")
            if not dist.is_initialized():
                # The store comes from the same env:// rendezvous torchrun prepares; holding it
                # gives counters that any rank can bump without a collective.
                store, rank, world = next(dist.rendezvous(
                    "env://", rank=self.launch.rank, world_size=self.launch.world_size,
                    timeout=GROUP_TIMEOUT))
                dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                        timeout=GROUP_TIMEOUT)
                self._joined = True
                self._store = dist.PrefixStore(_PREFIX, store)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._joined:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._joined = False

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value``, on every rank."""
        if not self._joined:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: T) -> list[T] | None:
        """Every rank's ``value`` in rank order on rank 0; None on the other ranks."""
        if not self._joined:
            return [value]
        import torch.distributed as dist

        boxes: list[Any] | None = [None] * self.launch.world_size if self.launch.is_main else None
        dist.gather_object(value, boxes, dst=0)
        return boxes

    def add(self, key: str, amount: int = 1) -> int:
        """Add to a job-wide counter (no collective: ranks need not call it together);
        returns the new total. For one process, counts locally."""
        if self._store is None:
            counters = self.__dict__.setdefault("_local", {})
            counters[key] = counters.get(key, 0) + amount
            return counters[key]
        return int(self._store.add(key, amount))

    def count(self, key: str) -> int:
        """The current total of a counter."""
        return self.add(key, 0)

    def wait_for(self, key: str, total: int, poll: Callable[[], None] | None = None,
                 every_s: float = 1.0) -> None:
        """Wait until counter ``key`` reaches ``total``, calling ``poll`` between looks (rank 0
        uses it to redraw the progress view while the others finish)."""
        while self.count(key) < total:
            if poll:
                poll()
            time.sleep(every_s)
        if poll:
            poll()
