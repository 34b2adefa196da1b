"""One process per GPU, as torchrun, ``accelerate launch`` and SLURM's ``srun`` start them.

celebctl schedules nothing itself: the launcher starts the processes and sets the usual
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; under
``srun`` without them, ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID`` stand in).
Each process takes a deterministic share of the work (:func:`shard`), runs on
``cuda:LOCAL_RANK``, and writes through the registry's writer lock. A small gloo process group
carries metadata only: the work list rank 0 decided on, progress counters in the group's
key-value store, and the rows of the final table.

Nothing waits forever for a process that is not there. Joining waits at most
``CELEBCTL_RENDEZVOUS_TIMEOUT`` seconds (default 300) for every process to arrive, telling the
caller who waits for how many at which ``MASTER_ADDR:MASTER_PORT`` meanwhile; every process then
shows a sign of life in the store every few seconds, and a wait for the others (the end of a job)
stops with the rank named when one has shown none for as long.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from .errors import InvalidOption, ProcessesMissing

T = TypeVar("T")
# A batch job can run for days; a collective that waits for the slowest rank must not time out.
GROUP_TIMEOUT = timedelta(days=7)
_PREFIX = "celebctl/"
RENDEZVOUS_TIMEOUT_ENV = "CELEBCTL_RENDEZVOUS_TIMEOUT"
DEFAULT_RENDEZVOUS_TIMEOUT_S = 300.0
FIRST_WAIT_NOTE_S = 5.0  # a quick join says nothing
WAIT_NOTE_EVERY_S = 30.0

Notify = Callable[[str], None]


def rendezvous_timeout(environ: Mapping[str, str] | None = None) -> float:
    """Seconds to wait for every process to arrive, and for a silent process before it is
    taken for gone (``CELEBCTL_RENDEZVOUS_TIMEOUT``, default 300)."""
    raw = (os.environ if environ is None else environ).get(RENDEZVOUS_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_RENDEZVOUS_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 10**7:
        raise InvalidOption(f"{RENDEZVOUS_TIMEOUT_ENV}={raw!r} is not a number of seconds "
                            "(for example 600).")
    return value


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
    distributed), leaving destroys it. ``notify`` gets a line now and then while this process
    waits for the others to arrive (the CLI prints it; the core never does).
    """

    def __init__(self, launch: Launch, notify: Notify | None = None):
        self.launch = launch
        self.notify = notify
        self._store: Any = None
        self._joined = False
        self._timeout = DEFAULT_RENDEZVOUS_TIMEOUT_S
        self._where = ""
        self._beating = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (beats, when they last moved)

    def __enter__(self) -> Group:
        if self.launch.distributed:
            import torch.distributed as dist

            if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
                raise InvalidOption("MASTER_ADDR and MASTER_PORT must be set for a job of "
                                    "several processes (torchrun sets them).")
            self._timeout = rendezvous_timeout()
            self._where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
            if not dist.is_initialized():
                self._join()
        return self

    def _who(self) -> str:
        return f"Rank {self.launch.rank} of {self.launch.world_size}"

    def _missing(self, count: int | None, waited: float) -> str:
        others = (f"{count} more process(es)" if count is not None else
                  f"the other {self.launch.world_size - 1} process(es)")
        return f"{self._who()} waited {waited:.0f} s for {others} at {self._where}"

    def _join(self) -> None:
        """Rendezvous, then wait in the store until every process has arrived (bounded, with
        a note now and then), then build the gloo group, which finds everyone there."""
        import torch.distributed as dist

        started = time.monotonic()
        arrived: list[int | None] = [None]
        done = threading.Event()

        def note_while_waiting() -> None:
            wait = FIRST_WAIT_NOTE_S
            while not done.wait(wait):
                if self.notify:
                    count = arrived[0]
                    more = (f"{self.launch.world_size - count} more process(es)"
                            if count is not None else
                            f"the other {self.launch.world_size - 1} process(es)")
                    self.notify(f"{self._who()} is waiting for {more} at {self._where} "
                                f"({time.monotonic() - started:.0f} s of {self._timeout:.0f} s; "
                                f"{RENDEZVOUS_TIMEOUT_ENV} sets the limit).")
                wait = WAIT_NOTE_EVERY_S

        ticker = threading.Thread(target=note_while_waiting, daemon=True)
        ticker.start()
        try:
            try:
                # The store comes from the same env:// rendezvous torchrun prepares; holding it
                # gives counters that any rank can bump without a collective.
                store, rank, world = next(dist.rendezvous(
                    "env://", rank=self.launch.rank, world_size=self.launch.world_size,
                    timeout=timedelta(seconds=self._timeout)))
            except (RuntimeError, OSError) as exc:  # torch's DistStoreError is a RuntimeError
                raise ProcessesMissing(
                    f"{self._missing(None, time.monotonic() - started)}; they never arrived "
                    f"({_first_line(exc)}). Check that every process was started (torchrun "
                    "--nnodes, srun --ntasks) and can reach that address; "
                    f"{RENDEZVOUS_TIMEOUT_ENV}=SECONDS waits longer.") from None
            self._store = dist.PrefixStore(_PREFIX, store)
            key = f"arrived/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
            arrived[0] = self._call(self._store.add, key, 1)
            while arrived[0] < self.launch.world_size:
                if time.monotonic() - started > self._timeout:
                    raise ProcessesMissing(
                        f"{self._missing(self.launch.world_size - arrived[0], self._timeout)}; "
                        "they never arrived. Check that every process was started (torchrun "
                        "--nnodes, srun --ntasks); "
                        f"{RENDEZVOUS_TIMEOUT_ENV}=SECONDS waits longer.")
                time.sleep(0.2)
                arrived[0] = self._call(self._store.add, key, 0)
        finally:
            done.set()
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=GROUP_TIMEOUT)
        self._joined = True
        self._beat_thread = threading.Thread(target=self._beat, daemon=True)
        self._beat_thread.start()

    def _beat(self) -> None:
        """Show a sign of life in the store until the group is left."""
        every = max(0.2, min(5.0, self._timeout / 4))
        while not self._beating.wait(every):
            try:
                self._store.add(f"beat/{self.launch.rank}", 1)
            except Exception:  # noqa: BLE001 - the store is gone; the main thread will say so
                return

    def _call(self, op: Callable[..., T], *args: Any) -> T:
        """A store operation; a store that stopped answering is a missing process."""
        try:
            return op(*args)
        except (RuntimeError, OSError) as exc:
            raise ProcessesMissing(
                f"{self._who()} lost the job's store at {self._where} ({_first_line(exc)}): "
                "the process or launcher that holds it (rank 0's) has stopped. Everything "
                "finished so far is kept; run the same command again for the rest.") from None

    def check_peers(self) -> None:
        """Raise ProcessesMissing, naming the rank, when another process has shown no sign of
        life for the rendezvous timeout (killed, out of memory, its machine lost)."""
        if self._store is None:
            return
        now = time.monotonic()
        for rank in range(self.launch.world_size):
            if rank == self.launch.rank:
                continue
            beats = self._call(self._store.add, f"beat/{rank}", 0)
            last = self._seen.get(rank)
            if last is None or last[0] != beats:
                self._seen[rank] = (beats, now)
            elif now - last[1] > self._timeout:
                raise ProcessesMissing(
                    f"Rank {rank} of {self.launch.world_size} stopped answering: no sign of "
                    f"life for {now - last[1]:.0f} s (killed, out of memory, or its machine "
                    f"lost?). {self._who()} stops waiting for it. Everything finished so far is "
                    "kept; run the same command again for the rest.")

    def __exit__(self, *exc: Any) -> None:
        self._beating.set()
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
        return int(self._call(self._store.add, key, amount))

    def count(self, key: str) -> int:
        """The current total of a counter."""
        return self.add(key, 0)

    def wait_for(self, key: str, total: int, poll: Callable[[], None] | None = None,
                 every_s: float = 1.0) -> None:
        """Wait until counter ``key`` reaches ``total``, calling ``poll`` between looks (rank 0
        uses it to redraw the progress view while the others finish). A process that shows no
        sign of life for the rendezvous timeout stops the wait with ProcessesMissing."""
        while self.count(key) < total:
            self.check_peers()
            if poll:
                poll()
            time.sleep(every_s)
        if poll:
            poll()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0].rstrip(".") if text else type(exc).__name__
