"""`celebctl add-many`: fit everyone a folder or manifest lists, K people per training batch, on
one process or on every GPU a launcher started.

The job is resumable because the registry is: an identity is written whole or not at all, so
after a crash (or Ctrl-C, or a killed rank) a rerun skips everyone already added with the same
photos and fits only the rest. One bad person never stops the batch: their row says why.
With several processes (torchrun, accelerate launch, srun) rank 0 decides who is pending and
every rank fits its deterministic share (:mod:`celebctl.distributed`). Each process claims a
person in the registry before fitting them (:mod:`celebctl.storage.claims`), so two jobs sharing
a registry never fit one person twice: the other skips them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..distributed import Group, Launch, device_for, launch_from_env, shard
from ..errors import CelebctlError, IdentityExists, InvalidOption
from .people import Person, read_people
from .settings import FitSettings, FitSubject, ProgressCallback

MAX_PACK = 64
DEFAULT_PACK_GPU = 8  # halved on an out-of-memory error until it fits
# bench_batch.py on the 2-core CPU of docs/benchmarks.md, tiny, 400 steps: pack 4 gave 1.42x the
# people per hour of pack 1, pack 8 only 1.25x.
DEFAULT_PACK_SMALL_CPU = 4


@dataclass
class BatchOptions:
    """What `add-many` was asked to do (the fit options are those of `add`)."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    settings: FitSettings = field(default_factory=FitSettings)
    pack: int | None = None  # people per training batch; None: by device
    replace: bool = False
    bundles: Path | None = None  # also write NAME.celeb here (for jobs across machines)
    bundle_basis: bool = False  # and carry the basis in each (a fresh machine needs no step)

    def check(self) -> None:
        """Refuse options that cannot work, before anything is read or loaded."""
        self.settings.check()
        if self.pack is not None and not 1 <= self.pack <= MAX_PACK:
            raise InvalidOption(f"--pack must be between 1 and {MAX_PACK}.")
        if self.bundles is not None and self.bundles.exists() and not self.bundles.is_dir():
            raise InvalidOption(f"--bundles {self.bundles} is not a folder.")
        if self.bundle_basis and self.bundles is None:
            raise InvalidOption("--with-basis puts the basis in the bundles: give --bundles DIR.")


@dataclass
class PersonRow:
    """One line of the final table."""

    name: str
    where: str
    status: str  # "added", "skipped" or "failed"
    reason: str = ""
    seconds: float | None = None
    rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "where": self.where, "status": self.status,
                "reason": self.reason, "seconds": self.seconds, "rank": self.rank}


@dataclass
class BatchResult:
    """What the job did (every rank's rows, on rank 0)."""

    rows: list[PersonRow]
    notes: list[str]
    elapsed_s: float
    pack: int | None
    world_size: int
    is_main: bool = True

    def count(self, status: str) -> int:
        return sum(1 for row in self.rows if row.status == status)

    @property
    def failed(self) -> bool:
        return self.count("failed") > 0

    def to_dict(self) -> dict[str, Any]:
        added = self.count("added")
        return {
            "added": added, "skipped": self.count("skipped"), "failed": self.count("failed"),
            "people": [row.to_dict() for row in self.rows], "notes": list(self.notes),
            "elapsed_s": round(self.elapsed_s, 3), "pack": self.pack,
            "processes": self.world_size,
            "people_per_hour": round(added * 3600 / self.elapsed_s, 1) if self.elapsed_s else None,
        }


def _bundle_path(options: BatchOptions, name: str) -> Path | None:
    from ..bundles import BUNDLE_SUFFIX

    return options.bundles / f"{name}{BUNDLE_SUFFIX}" if options.bundles else None


def _photo_hashes(person: Person) -> list[str]:
    from ..storage.checksums import sha256_file

    if not person.sha256:
        person.sha256 = [sha256_file(photo) for photo in person.photos]
    return person.sha256


def _plan_person(person: Person, options: BatchOptions) -> tuple[str, str]:
    """("failed" | "skipped" | "export" | "fit", reason), from the registry and bundle folder."""
    from .. import registry

    if person.problem:
        return "failed", person.problem
    if options.replace:
        return "fit", ""
    bundle = _bundle_path(options, person.name)
    if bundle is not None and os.path.lexists(bundle):
        return _same_photos(person, lambda: _bundle_meta(bundle), f"{bundle.name} exists",
                            str(bundle))
    if not registry.identity_exists(person.name):
        return "fit", ""
    status, reason = _same_photos(
        person, lambda: registry.get_identity(person.name, verify="coefficients").meta,
        "already added with these photos", f"'{person.name}' in the registry")
    return ("export", "") if status == "skipped" and bundle is not None else (status, reason)


def _bundle_meta(bundle: Path) -> dict[str, Any]:
    from ..bundles import read_bundle

    return read_bundle(bundle).write.meta


def _same_photos(person: Person, read_meta, done: str, subject: str) -> tuple[str, str]:
    """("skipped", done) when the recorded identity was fitted from these very photos;
    ("failed", why) when from others or when it cannot be read."""
    try:
        meta = read_meta()
        hashes = _photo_hashes(person)
    except (CelebctlError, OSError) as exc:
        return "failed", f"{subject} cannot be read: {exc}"
    recorded = [str(s.get("photo_sha256", "")) for s in meta.get("sources", [])]
    if sorted(recorded) != sorted(hashes):
        return "failed", (f"Name taken: {subject} was fitted from other photos. Use --replace to "
                          "refit from these, or give this person another name.")
    return "skipped", done


def resolve_pack(requested: int | None, components, device) -> int:
    """People per training batch: as asked, else 8 on a GPU (halved on out-of-memory; an H200
    ran the SD 1.5 UNet's forward and backward at batch 16 in 113 ms against 80.8 ms at batch
    2), 4 on a CPU for a small UNet whose per-call costs a bigger batch amortises (measured
    best), 1 for a real model on a CPU, whose convolutions are compute-bound there (see
    :mod:`celebctl.models.convolutions`), so packing would only add memory."""
    from ..models.convolutions import NATIVE_CONV_MAX_WORK, largest_conv_work

    if requested is not None:
        return requested
    if device.type == "cuda":
        return DEFAULT_PACK_GPU
    scale = 2 ** (len(components.vae.config.block_out_channels) - 1)
    side = components.default_resolution // scale
    small = largest_conv_work(components.unet, side) <= NATIVE_CONV_MAX_WORK
    return DEFAULT_PACK_SMALL_CPU if small else 1


class _Fitter:
    """One process's share of the job: the model loaded once, people fitted K at a time."""

    def __init__(self, options: BatchOptions, launch: Launch, progress: ProgressCallback | None):
        self.options, self.launch, self.progress = options, launch, progress
        self.components: Any = None
        # Until the model is loaded: the pack asked for, else the most any device uses.
        self.pack = options.pack or max(DEFAULT_PACK_GPU, DEFAULT_PACK_SMALL_CPU)
        self.notes: list[str] = []
        self.claims: dict[str, Any] = {}  # name -> storage.claims.Claim held by this process

    def claim(self, person: Person) -> str | PersonRow:
        """Claim ``person`` in the registry before fitting them, so that another job sharing it
        never fits them too: "fit", "export" (added meanwhile; only the bundle is due), or the
        row of a person another process is fitting (skipped) or added meanwhile."""
        from .. import paths
        from ..storage.claims import describe_holder, try_claim

        if person.name in self.claims:  # back in the queue after a pack shrank
            return "fit"
        held = try_claim(paths.claims_dir(), person.name)
        if isinstance(held, dict):
            return self._row(person, "skipped", f"being fitted by {describe_holder(held)}; "
                             "its job reports the result")
        self.claims[person.name] = held
        status, reason = _plan_person(person, self.options)  # another job may have added them
        if status in ("fit", "export"):
            return status
        self.release(person.name)
        if status == "skipped":
            reason = f"{reason} (added meanwhile by another process)"
        return self._row(person, status, reason)

    def release(self, name: str) -> None:
        """Give up the claim on ``name`` (once they are registered or failed)."""
        held = self.claims.pop(name, None)
        if held is not None:
            held.release()

    def load(self) -> None:
        """Load the face encoder, the model and its basis, once, when the first person of this
        share is ready (a rerun with nobody left to fit loads nothing)."""
        if self.components is not None:
            return
        from .. import faces, models
        from .identities import load_fit_model

        options, progress = self.options, self.progress
        self.spec = models.resolve_model_spec(options.model)
        self.device = models.resolve_device(device_for(options.device, self.launch))
        models.resolve_dtype(options.dtype, self.device)
        self.encoder = faces.load_face_encoder(self.spec.face_encoder, device=self.device,
                                               progress=progress)
        self.components, self.basis = load_fit_model(self.spec, self.device, options.dtype,
                                                     progress)
        self.pack = resolve_pack(options.pack, self.components, self.device)

    def _note(self, message: str | None) -> None:
        if message and message not in self.notes:
            self.notes.append(message)

    def fit(self, ready: list[tuple[Person, list[Any]]]) -> list[PersonRow]:
        """Fit ``ready`` (people with their prepared faces) as one pack and register them."""
        from .phases import PackedFitError, fit_packed

        started = time.perf_counter()
        groups = [[FitSubject(p.name, [f.aligned for f in prepared])] for p, prepared in ready]
        try:
            results = fit_packed(self.components, self.basis.mean, self.basis.components, groups,
                                 self.encoder, self.options.settings, self.progress)
        except PackedFitError as exc:
            bad = ready[exc.fit_index] if len(ready) > 1 else ready[0]
            rows = [self._row(bad[0], "failed", str(exc))]
            rest = [pair for pair in ready if pair is not bad]
            return rows + (self.fit(rest) if rest else [])
        except Exception as exc:
            if not _out_of_memory(exc) or len(ready) == 1:
                raise
            import torch

            torch.cuda.empty_cache()  # what the failed pack held, before the halves try
            self.pack = max(1, len(ready) // 2)
            self._note(f"Out of GPU memory with {len(ready)} people per batch; went on with "
                       f"{self.pack} (set --pack to choose).")
            half = len(ready) // 2
            return self.fit(ready[:half]) + self.fit(ready[half:])
        seconds = (time.perf_counter() - started) / len(ready)
        return [self._register(person, prepared, result, seconds)
                for (person, prepared), result in zip(ready, results, strict=True)]

    def _register(self, person: Person, prepared, result, seconds: float) -> PersonRow:
        from .. import registry
        from .identities import new_identity_write, noise_model_note

        for note in result.notes:
            self._note(note)
        self._note(noise_model_note(self.spec))
        try:
            write = new_identity_write(person.name, person.photos, prepared, result,
                                       self.components, self.spec, self.basis)
            registry.save_identity(write, replace=self.options.replace)
            self.export(person)
        except IdentityExists as exc:
            # Added while this process fitted (by a job that does not claim, or on a file
            # system without locks): the same photos are no failure.
            status, reason = _same_photos(
                person, lambda: registry.get_identity(person.name, verify="coefficients").meta,
                "added meanwhile by another process with these photos",
                f"'{person.name}' in the registry")
            return self._row(person, status, reason if status == "skipped" else str(exc))
        except CelebctlError as exc:
            return self._row(person, "failed", str(exc))
        return self._row(person, "added", "", round(seconds, 3))

    def export(self, person: Person) -> None:
        """Write the person's bundle when the job writes bundles."""
        from ..bundles import export_bundle

        bundle = _bundle_path(self.options, person.name)
        if bundle is not None:
            export_bundle(person.name, bundle, overwrite=True,
                          with_basis=self.options.bundle_basis)

    def _row(self, person: Person, status: str, reason: str = "",
             seconds: float | None = None) -> PersonRow:
        return PersonRow(person.name, person.where, status, reason, seconds, self.launch.rank)


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)


def _prepare(person: Person) -> list[Any]:
    from .identities import prepare_photos

    prepared, _ = prepare_photos(person.photos)
    person.sha256 = [face.sha256 for face in prepared]
    return prepared


class _Progress:
    """Rank 0's view of the whole job: people done over all ranks, from the group's counters."""

    def __init__(self, group: Group, total: int, settled: int,
                 progress: ProgressCallback | None):
        self.group, self.total, self.progress = group, total, progress
        self.started = time.perf_counter()
        self.base = settled  # skipped or failed before any fit
        self.shown = -1

    def settle(self, rows: Sequence[PersonRow]) -> None:
        """Count this rank's finished people, then redraw (rank 0)."""
        if rows:
            self.group.add("settled", len(rows))
            self.group.add("added", sum(1 for r in rows if r.status == "added"))
        self.draw()

    def draw(self) -> None:
        if not self.progress:
            return
        settled = self.base + self.group.count("settled")
        if settled == self.shown:
            return
        self.shown = settled
        hours = (time.perf_counter() - self.started) / 3600
        added = self.group.count("added")
        self.progress("people", settled, self.total,
                      {"rate": f"{added / hours:.0f} people/h" if hours > 0 and added else ""})


def add_many(source: Path | str, options: BatchOptions | None = None, *,
             launch: Launch | None = None,
             progress: ProgressCallback | None = None,
             notify: Callable[[str], None] | None = None) -> BatchResult:
    """Fit everyone ``source`` lists who is not registered yet (see the module docstring).

    Names, photos' presence and options are checked before any model loads; failures of one
    person (no face, unreadable photo, name taken, a diverged fit) become that person's row.
    Under a launcher, call it in every process: each fits its share, and rank 0 gets every
    rank's rows (the others get their own). ``notify`` gets a line now and then while this
    process waits for the others to arrive (:class:`celebctl.distributed.Group`).
    """
    from .. import models, registry
    from .identities import with_clip_skip

    options = options or BatchOptions()
    options.check()
    launch = launch or launch_from_env()
    # A model that cannot exist fails now, as in `add`; so does a clip skip out of its range.
    options.settings = with_clip_skip(options.settings, models.resolve_model_spec(options.model))
    models.resolve_dtype(options.dtype, models.resolve_device(device_for(options.device, launch)))
    started = time.perf_counter()
    people = read_people(source)
    cleaned: list[str] = []
    with Group(launch, notify) as group:
        if launch.is_main:  # before any rank can start a bundle of its own
            cleaned = _clean_bundle_temps(options)
        plan = group.broadcast([_plan_person(p, options) for p in people]
                               if launch.is_main else None)
        registry.check_writable()
        if options.bundles is not None:
            from ..storage.atomic import ensure_private_dir

            ensure_private_dir(options.bundles)
        rows = [PersonRow(p.name, p.where, status, reason, rank=launch.rank)
                for p, (status, reason) in zip(people, plan, strict=True)
                if status in ("failed", "skipped") and launch.is_main]
        pending = [p for p, (status, _) in zip(people, plan, strict=True)
                   if status in ("fit", "export")]
        exports = {p.name for p, (status, _) in zip(people, plan, strict=True)
                   if status == "export"}
        view = _Progress(group, len(people), len(people) - len(pending),
                         progress if launch.is_main else None)
        view.draw()
        fitter = _Fitter(options, launch, progress if launch.is_main else None)
        rows += _run_share(fitter, shard(pending, launch), exports, view)
        group.add("ranks_done")
        group.wait_for("ranks_done", launch.world_size, poll=view.draw)
        gathered = group.gather((rows, fitter.notes))
    notes = cleaned + fitter.notes
    if gathered is not None:
        rows = [row for part, _ in gathered for row in part]
        notes = cleaned + list(dict.fromkeys(n for _, part in gathered for n in part))
    order = {(p.name, p.where): i for i, p in enumerate(people)}  # the source's own order
    rows.sort(key=lambda r: order.get((r.name, r.where), len(order)))
    notes += _word_names_note([r.name for r in rows if r.status == "added"])
    return BatchResult(rows=rows, notes=notes, elapsed_s=time.perf_counter() - started,
                       pack=fitter.pack if fitter.components is not None else options.pack,
                       world_size=launch.world_size, is_main=launch.is_main)


def _clean_bundle_temps(options: BatchOptions) -> list[str]:
    """Delete the temp files that bundle writes of killed processes left in the bundle folder
    (``.NAME.celeb.celebctl-tmp-PID-...``, PID gone); a note says how many."""
    from ..bundles import BUNDLE_SUFFIX
    from ..storage.userfiles import remove_stale_temp_files

    if options.bundles is None or not options.bundles.is_dir():
        return []
    removed = remove_stale_temp_files(options.bundles, BUNDLE_SUFFIX)
    if not removed:
        return []
    return [f"Removed {len(removed)} temp file(s) that interrupted bundle writes left in "
            f"{options.bundles}."]


def _word_names_note(names: list[str]) -> list[str]:
    """One note for the added names that are also ordinary words (as `add` warns per name)."""
    from ..prompting import word_name_note

    words = [name for name in names if word_name_note(name)]
    if not words:
        return []
    shown = ", ".join(words[:10]) + (f" and {len(words) - 10} more" if len(words) > 10 else "")
    return [f"{len(words)} name(s) are also ordinary words ({shown}): every such word in a "
            "prompt draws the identity. Write \\name for the plain word, or rename them "
            "(`celebctl rename`)."]


def _run_share(fitter: _Fitter, mine: list[Person], exports: set[str],
               view: _Progress) -> list[PersonRow]:
    """Fit this process's people, a pack at a time, registering each as it finishes."""
    try:
        return _fit_share(fitter, mine, exports, view)
    finally:
        for name in list(fitter.claims):
            fitter.release(name)


def _fit_share(fitter: _Fitter, mine: list[Person], exports: set[str],
               view: _Progress) -> list[PersonRow]:
    rows: list[PersonRow] = []
    queue = list(mine)
    while queue:
        ready: list[tuple[Person, list[Any]]] = []
        settled: list[PersonRow] = []
        while queue and len(ready) < fitter.pack:
            person = queue.pop(0)
            if person.name in exports:  # registered with these photos; only the bundle is due
                settled.append(_export_only(fitter, person))
                continue
            claimed = fitter.claim(person)
            if isinstance(claimed, PersonRow):
                settled.append(claimed)
                continue
            if claimed == "export":
                settled.append(_export_only(fitter, person))
                fitter.release(person.name)
                continue
            try:
                ready.append((person, _prepare(person)))
            except CelebctlError as exc:
                settled.append(fitter._row(person, "failed", str(exc)))
        if ready:
            try:
                fitter.load()
                queue[:0] = [person for person, _ in ready[fitter.pack:]]  # the pack may shrink
                ready = ready[:fitter.pack]
                settled += fitter.fit(ready)
            except CelebctlError as exc:
                # The model cannot load or fit here (missing weights, a basis mismatch): every
                # person this process still has fails with the reason, and the job still ends
                # with its table on every rank instead of leaving the others waiting.
                left = [person for person, _ in ready] + queue
                settled += [fitter._row(person, "failed", str(exc)) for person in left]
                queue.clear()
        for row in settled:  # registered or failed: the claim has done its work
            fitter.release(row.name)
        rows += settled
        view.settle(settled)
    return rows


def _export_only(fitter: _Fitter, person: Person) -> PersonRow:
    try:
        fitter.export(person)
    except CelebctlError as exc:
        return fitter._row(person, "failed", str(exc))
    return fitter._row(person, "added", "bundle written from the registry")

