"""Crashes, full disks, read-only homes and races, run through the real code in subprocesses.

Every change celebctl makes to the disk passes a checkpoint (``faults.fault_point``) first;
``CELEBCTL_FAULT`` kills the process there (kill@N), makes that write fail with ENOSPC or EROFS,
or holds it until a file appears (wait@N:PATH, to order two processes). A kill before every
checkpoint reaches every state a crash can leave on disk, so the kill schedule below is
exhaustive; set CELEBCTL_FAULT_POINTS=N to run a seeded sample of N per variant instead.

`add` and `joint` fit for seconds before they write, so tests/fault_driver.py runs the command
once and forks a child per case at the writer lock (see its docstring); a few plain `celebctl`
processes are killed as well, and the races run plain processes side by side.

After every crash: `celebctl list` works, every identity is whole and either the old or the
new one, and the next write or `celebctl doctor --fix` leaves no temp file behind.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from celebctl import paths, registry
from celebctl.cli import app
from celebctl.storage import atomic, faults, filemodes
from tests.helpers import unit_rows

ROOT = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).resolve().parent / "fault_driver.py"
PHOTO = Path(__file__).resolve().parent / "data" / "astronaut.png"
SEED = 6
# Checkpoints of `add` and `joint` in a plain process: 1 is the early check that the data home
# is writable, 2 comes just before the writer lock is taken, 3 is the first write under it.
BEFORE_LOCK, UNDER_LOCK = 2, 3
FIT_ARGS = ["--model", "tiny", "--steps", "1", "--quiet"]
JOURNAL_WARNING = "`joint` refit is being written or was interrupted"
runner = CliRunner()


def _max_points() -> int | None:
    value = os.environ.get("CELEBCTL_FAULT_POINTS", "all")
    return None if value == "all" else int(value)


def subprocess_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (faults.FAULT_ENV, faults.FAULT_TRACE_ENV, "CELEBCTL_DEBUG")}
    # One thread per process: OpenMP spin-waits make parallel runs on 2 cores crawl.
    env.update({"CELEBCTL_HOME": str(home), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", **extra})
    return env


def celebctl(home: Path, *args: str, **extra: str) -> subprocess.Popen:
    """Start the real entry point in a subprocess."""
    return subprocess.Popen([sys.executable, "-m", "celebctl", *args], cwd=ROOT,
                            env=subprocess_env(home, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@contextlib.contextmanager
def using_home(home: Path) -> Iterator[None]:
    old = os.environ.get(paths.HOME_ENV)
    os.environ[paths.HOME_ENV] = str(home)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(paths.HOME_ENV, None)
        else:
            os.environ[paths.HOME_ENV] = old


def identity_state(home: Path) -> dict[str, str]:
    """name -> sha256 of the coefficients, for every identity; each must load and verify."""
    with using_home(home):
        scan = registry.list_identities()
        state = {}
        for ident in scan.identities:
            full = registry.get_identity(ident.name, verify="all")  # hashes every file
            full.load_coefficients()
            if full.has_face:
                full.load_face_png()
                full.load_face_embedding()
            state[ident.name] = full.meta["files"]["coefficients"]["sha256"]
        return state


def temp_files(home: Path) -> set[str]:
    return {str(p.relative_to(home)) for p in atomic.find_temp_files(home)}


def wait_for_line(trace: Path, number: int, proc: subprocess.Popen, kind: str | None = None,
                  timeout: float = 900) -> None:
    """Wait until a process's CELEBCTL_FAULT_TRACE file reaches checkpoint ``number``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = trace.read_text().splitlines() if trace.exists() else []
        if len(lines) >= number:
            if kind is not None:
                assert lines[number - 1].split()[1] == kind, lines
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError(f"checkpoint {number} never reached")


# --------------------------------------------------------------------------------------------
# the prepared data homes


@dataclass
class Template:
    root: Path
    base: Path  # tiny model + basis + alice + bob
    bundle: Path  # carol, exported: what `import` brings in

    def variant(self, name: str) -> Path:
        return self.root / name


def _make_debris(home: Path) -> None:
    """What crashed writers leave behind: a staging folder, a half-written temp file, a pending
    replace (marker + an orphaned new-generation file) and an interrupted rename's marker."""
    ids = home / "identities"
    staging = ids / f"dave{atomic.TMP_MARK}4242-new"
    staging.mkdir(mode=0o700)
    shutil.copy(next((ids / "alice").glob("coefficients-*")), staging / "coefficients-x.bin")
    (staging / f"identity.toml{atomic.TMP_MARK}4242-0001").write_bytes(b"schema_vers")
    (ids / "alice" / f"identity.toml{atomic.TMP_MARK}4242-0002").write_bytes(b"")
    (ids / f"alice{atomic.TMP_MARK}{registry.PENDING_SUFFIX}").write_bytes(b"")
    (ids / "alice" / "coefficients-000000000000.safetensors").write_bytes(b"\0" * 64)
    (ids / f"zoe{atomic.TMP_MARK}{registry.RENAME_INFIX}zed").write_bytes(b"")
    for path in [staging, *home.rglob("*")]:
        path.chmod(0o700 if path.is_dir() else 0o600)


@pytest.fixture(scope="module")
def template(_tiny_template, tmp_path_factory) -> Template:
    from celebctl import basis, bundles, faces

    root = tmp_path_factory.mktemp("fault-homes")
    base = root / "base"
    shutil.copytree(_tiny_template, base)
    with using_home(base):
        info = basis.list_bases()[0]
        crop = faces.prepare_face(PHOTO).png_bytes()
        rng = np.random.default_rng(SEED)
        for name in ("alice", "bob", "carol"):
            registry.save_identity(registry.IdentityWrite(
                name=name,
                coefficients=unit_rows(rng.standard_normal((2, info.components))),
                meta={"basis_id": info.id, "model": "tiny", "face_encoder": "random-init",
                      "hidden": info.hidden},
                face_png=crop,
                face_embedding=unit_rows(rng.standard_normal(512)),
            ))
        bundle = root / "carol.celeb"
        bundles.export_bundle("carol", bundle)
        registry.remove_identity("carol")
        shutil.rmtree(base / "cache", ignore_errors=True)
    filemodes.repair_modes(base)
    without_bob = root / "without-bob"
    shutil.copytree(base, without_bob, symlinks=True)
    shutil.rmtree(without_bob / "identities" / "bob")
    with_debris = root / "with-debris"
    shutil.copytree(base, with_debris, symlinks=True)
    _make_debris(with_debris)
    return Template(root=root, base=base, bundle=bundle)


# --------------------------------------------------------------------------------------------
# checking one crashed home


def allowed_before_fix(old: dict, new: dict, shape: str) -> list[dict]:
    """States a crash may leave until the next write (or doctor --fix) cleans up."""
    states = [old, new]
    if shape == "rename":  # the new entry is committed before the old one is retired
        states.append({**old, **new})
    if shape == "joint":  # identities are committed one by one; the journal undoes a mix
        names = sorted(set(old) | set(new))
        for choice in itertools.product((old, new), repeat=len(names)):
            states.append({n: src[n] for n, src in zip(names, choice, strict=True) if n in src})
    return states


def check_crashed_home(case: dict, old: dict, new: dict, shape: str, fix_with: str,
                       bundle: Path) -> None:
    home = Path(case["home"])
    where = f"{case['fault']} in {home}"
    assert case["status"] == "killed" and case["code"] == -9, where
    # 1. `celebctl list` works, and nothing but a pending joint is worth a warning.
    with using_home(home):
        result = runner.invoke(app, ["list", "--json"])
    assert result.exit_code == 0, (where, result.output)
    warnings = json.loads(result.stdout)["warnings"]
    assert all(JOURNAL_WARNING in w for w in warnings), (where, warnings)
    # 2. Every identity is whole, and old or new.
    state = identity_state(home)
    assert state in allowed_before_fix(old, new, shape), (where, state)
    # 3. The next write, or doctor --fix, cleans up (and undoes a half-written joint).
    with using_home(home):
        if fix_with == "doctor":
            result = runner.invoke(app, ["doctor", "--fix"])
        else:
            result = runner.invoke(app, ["import", str(bundle), "--as", "zed"])
        assert result.exit_code == 0, (where, fix_with, result.output)
        after = {k: v for k, v in identity_state(home).items() if k != "zed"}
        assert after in (old, new), (where, fix_with, after)
        assert temp_files(home) == set(), (where, fix_with, temp_files(home))
        if fix_with != "doctor":  # (`doctor --fix` exits 0 only when nothing is left)
            result = runner.invoke(app, ["doctor"])
            assert result.exit_code == 0, (where, fix_with, result.output)


def check_failed_write(case: dict, old: dict, pristine: Path) -> None:
    """ENOSPC / EROFS: a clear error, exit 1, the registry as it was, no new temp file."""
    home = Path(case["home"])
    where = f"{case['fault']} in {home}"
    assert case["status"] == "exited" and case["code"] == 1, (where, case["stderr"])
    assert case["stderr"].startswith("Error: "), (where, case["stderr"])
    assert "Traceback" not in case["stderr"], where
    reason = "the disk is full" if case["fault"].startswith("ENOSPC") else "read-only"
    assert reason in case["stderr"] and "Nothing was changed" in case["stderr"], where
    assert identity_state(home) == old, where
    assert temp_files(home) <= temp_files(pristine), (where, temp_files(home))
    with using_home(home):
        assert runner.invoke(app, ["list", "--json"]).exit_code == 0


# --------------------------------------------------------------------------------------------
# kill -9 / ENOSPC / EROFS at every checkpoint of each command


@dataclass
class Scenario:
    argv: list[str]
    variants: tuple[str, ...]  # template homes to run it in
    shape: str = "atomic"  # what a crash may leave before cleanup (see allowed_before_fix)


def scenarios(template: Template) -> dict[str, Scenario]:
    return {
        # `add NAME --replace` adds NAME when it is absent, so one fit covers both paths.
        "add": Scenario(["add", "bob", str(PHOTO), "--replace", *FIT_ARGS],
                        ("without-bob", "base")),
        "joint": Scenario(["joint", "alice", "bob", *FIT_ARGS], ("base",), shape="joint"),
        "import": Scenario(["import", str(template.bundle), "--as", "bob", "--force"],
                           ("without-bob", "base")),
        "rename": Scenario(["rename", "bob", "dave"], ("base", "with-debris"), shape="rename"),
        "remove": Scenario(["remove", "bob", "--yes"], ("base", "with-debris")),
    }


def run_driver(template: Template, tmp_path: Path, scenario: Scenario) -> dict:
    plan = {
        "argv": scenario.argv,
        "variants": {v: str(template.variant(v)) for v in scenario.variants},
        "workdir": str(tmp_path / "work"),
        "faults": ["kill@*", "ENOSPC@*", "EROFS@1"],
        "seed": SEED,
        "max_points": _max_points(),
    }
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    proc = subprocess.run([sys.executable, str(DRIVER), str(plan_file)], cwd=ROOT,
                          env=subprocess_env(template.base), capture_output=True, text=True,
                          timeout=900)
    report_file = tmp_path / "work" / "report.json"
    assert report_file.exists(), (proc.returncode, proc.stdout, proc.stderr[-3000:])
    report = json.loads(report_file.read_text())
    assert "error" not in report, report
    return report


@pytest.mark.parametrize("command", ["add", "joint", "import", "rename", "remove"])
def test_crash_at_every_checkpoint(command, template, tmp_path):
    scenario = scenarios(template)[command]
    report = run_driver(template, tmp_path, scenario)
    kills = 0
    for variant, data in report["variants"].items():
        pristine = Path(data["pristine"])
        trace_home = Path(data["trace_home"])
        assert data["trace_result"]["code"] == 0, data["trace_result"]
        old, new = identity_state(pristine), identity_state(trace_home)
        assert old != new, variant
        for index, case in enumerate(data["cases"]):
            if case["fault"].startswith("kill"):
                kills += 1
                fix_with = "doctor" if index % 2 else "next-write"
                check_crashed_home(case, old, new, scenario.shape, fix_with, template.bundle)
            else:
                check_failed_write(case, old, pristine)
            shutil.rmtree(case["home"], ignore_errors=True)
        assert any(c["fault"] == "EROFS@1" for c in data["cases"])
    assert kills >= 20, f"only {kills} kill points for {command}"


def test_plain_processes_killed_at_seeded_points(template, tmp_path):
    """The same crashes without the fork driver: real `celebctl` processes, SIGKILLed."""
    rng = random.Random(SEED)
    commands = {"rename": ["rename", "bob", "dave"], "remove": ["remove", "bob", "--yes"],
                "import": ["import", str(template.bundle), "--as", "dave"]}
    for name, argv in commands.items():
        trace_home, trace = tmp_path / f"{name}-trace", tmp_path / f"{name}.trace"
        shutil.copytree(template.base, trace_home, symlinks=True)
        code, _, err = finish(celebctl(trace_home, *argv, CELEBCTL_FAULT_TRACE=str(trace)))
        assert code == 0, err
        old, new = identity_state(template.base), identity_state(trace_home)
        count = len(trace.read_text().splitlines())
        shape = "rename" if name == "rename" else "atomic"
        for point in sorted(rng.sample(range(1, count + 1), 3)):
            home = tmp_path / f"{name}-{point}"
            shutil.copytree(template.base, home, symlinks=True)
            code, _, _ = finish(celebctl(home, *argv, CELEBCTL_FAULT=f"kill@{point}"))
            case = {"fault": f"kill@{point}", "home": str(home),
                    "status": "killed" if code < 0 else "exited", "code": code}
            check_crashed_home(case, old, new, shape, "doctor", template.bundle)


@pytest.mark.parametrize("argv", [["add", "dave", str(PHOTO), *FIT_ARGS],
                                  ["joint", "alice", "bob", *FIT_ARGS]], ids=["add", "joint"])
def test_read_only_home_fails_before_the_fit(argv, template, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(template.base, home, symlinks=True)
    code, _, err = finish(celebctl(home, *argv, CELEBCTL_FAULT="EROFS@1"))
    assert code == 1 and err.startswith("Error: Could not write"), err
    assert "the file system is read-only; point CELEBCTL_HOME at a writable folder" in err
    assert "Traceback" not in err
    assert identity_state(home) == identity_state(template.base)
    assert temp_files(home) == set()
    # No model was loaded, nothing was fitted: progress goes to the pipe as plain lines.
    assert "Loading" not in err and "Fitting" not in err, err


def test_reading_a_read_only_home_still_works(template, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(template.base, home, symlinks=True)
    for argv in (["list", "--json"], ["show", "alice"], ["doctor"]):
        code, out, err = finish(celebctl(home, *argv, CELEBCTL_FAULT="EROFS@1"))
        assert code == 0, (argv, err)
        assert "Traceback" not in err
    code, _, err = finish(celebctl(home, "doctor", "--fix", CELEBCTL_FAULT="EROFS@1"))
    assert code == 1 and err.startswith("Error: Could not write") and "read-only" in err


# --------------------------------------------------------------------------------------------
# races between processes


def test_two_adds_of_different_names(template, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(template.base, home, symlinks=True)
    go, trace_a, trace_b = tmp_path / "go", tmp_path / "a.trace", tmp_path / "b.trace"
    # carol holds the writer lock half-way through her write until dave is waiting for it.
    first = celebctl(home, "add", "carol", str(PHOTO), *FIT_ARGS,
                     CELEBCTL_FAULT=f"wait@{UNDER_LOCK}:{go}", CELEBCTL_FAULT_TRACE=str(trace_a))
    second = celebctl(home, "add", "dave", str(PHOTO), *FIT_ARGS, "--seed", "1",
                      CELEBCTL_FAULT_TRACE=str(trace_b))
    wait_for_line(trace_a, UNDER_LOCK, first, "mkdir")
    wait_for_line(trace_b, BEFORE_LOCK, second, "lock")
    go.touch()
    results = [finish(first), finish(second)]
    assert [r[0] for r in results] == [0, 0], results
    state = identity_state(home)
    old = identity_state(template.base)
    assert set(state) == {"alice", "bob", "carol", "dave"}
    assert {k: state[k] for k in old} == old
    assert state["carol"] != state["dave"]
    assert temp_files(home) == set()


@pytest.mark.parametrize("order", ["remove-first", "add-first"])
def test_add_racing_remove(order, template, tmp_path):
    """`add alice --replace` and `remove alice` at once: alice ends up new or absent, whole."""
    home = tmp_path / "home"
    shutil.copytree(template.base, home, symlinks=True)
    go, trace_add, trace_rm = tmp_path / "go", tmp_path / "add.trace", tmp_path / "rm.trace"
    hold, kind = (BEFORE_LOCK, "lock") if order == "remove-first" else (UNDER_LOCK, "create")
    adder = celebctl(home, "add", "alice", str(PHOTO), "--replace", *FIT_ARGS,
                     CELEBCTL_FAULT=f"wait@{hold}:{go}", CELEBCTL_FAULT_TRACE=str(trace_add))
    wait_for_line(trace_add, hold, adder, kind)
    remover = celebctl(home, "remove", "alice", "--yes", CELEBCTL_FAULT_TRACE=str(trace_rm))
    if order == "remove-first":
        rm_result = finish(remover)
        go.touch()
    else:
        wait_for_line(trace_rm, 1, remover, "lock")  # waiting for the lock the add holds
        go.touch()
        rm_result = finish(remover)
    add_result = finish(adder)
    assert add_result[0] == 0 and rm_result[0] == 0, (add_result, rm_result)
    state = identity_state(home)
    old = identity_state(template.base)
    if order == "remove-first":  # --replace then adds alice anew
        assert set(state) == {"alice", "bob"} and state["alice"] != old["alice"]
    else:
        assert set(state) == {"bob"}
    assert state["bob"] == old["bob"] and temp_files(home) == set()


@pytest.mark.parametrize("order", ["rename-first", "joint-first"])
def test_joint_racing_rename(order, template, tmp_path):
    """A rename during a joint's fit makes the joint fail cleanly; never a resurrected bob."""
    home = tmp_path / "home"
    shutil.copytree(template.base, home, symlinks=True)
    go, trace_joint, trace_mv = tmp_path / "go", tmp_path / "j.trace", tmp_path / "mv.trace"
    hold, kind = (BEFORE_LOCK, "lock") if order == "rename-first" else (UNDER_LOCK, "mkdir")
    joint = celebctl(home, "joint", "alice", "bob", *FIT_ARGS,
                     CELEBCTL_FAULT=f"wait@{hold}:{go}", CELEBCTL_FAULT_TRACE=str(trace_joint))
    wait_for_line(trace_joint, hold, joint, kind)
    mover = celebctl(home, "rename", "bob", "dave", CELEBCTL_FAULT_TRACE=str(trace_mv))
    if order == "rename-first":
        mv_result = finish(mover)
        go.touch()
    else:
        wait_for_line(trace_mv, 1, mover, "lock")
        go.touch()
        mv_result = finish(mover)
    joint_result = finish(joint)
    old = identity_state(template.base)
    state = identity_state(home)
    assert mv_result[0] == 0, mv_result
    assert set(state) == {"alice", "dave"}
    if order == "rename-first":
        code, _, err = joint_result
        assert code == 1 and "Traceback" not in err
        assert err.startswith("Error: Identity 'bob' was removed or renamed by another celebctl "
                              "process while this command ran; nothing was written."), err
        assert state == {"alice": old["alice"], "dave": old["bob"]}
    else:
        assert joint_result[0] == 0, joint_result
        assert state["alice"] != old["alice"] and state["dave"] != old["bob"]
    assert temp_files(home) == set()
