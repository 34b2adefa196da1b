"""The GPU check: every GPU measurement celebctl needs, in one call, on a bare H100/H200.

    python3 benchmarks/gpu_check.py --out OUT                     # on the GPU machine
    python3 benchmarks/gpu_check.py --device cpu --quick --out OUT  # dry run on a CPU, tiny

Parts, in this order, each in its own process with its own time limit (a part that fails or
runs out of time is recorded with the tail of its stderr, and the rest still run):

  gpu_tests    `pytest -m gpu`
  save_folder  sd15-random saved as an fp16 diffusers folder + a VGGFace2-layout face-weights
               file (CELEBCTL_FACE_WEIGHTS), which the later parts load as a real model
  fit_step     bench_fit on that model in bf16: celebctl's step captured as a CUDA graph, the
               same step eager, and the reference loop
  autocast     the bare bf16 UNet, forward + backward, with and without torch.autocast
  add          `celebctl add` end to end from the folder: the full 400-step fit
  render_1     `celebctl render -n 1` end to end
  render_8     `celebctl render -n 8 --batch-size 8` end to end
  diffusers    plain diffusers on the same folder: 1 image, then 8 at batch 8
  serve        `celebctl serve` on that folder: one image of alice through the WebUI API,
               warm; the answer's wall time minus the render's own time
  sdxl_step    celebctl's fit step on sdxl-random

Each part reports its process's peak GPU memory (torch.cuda.max_memory_allocated) as JSON on a
marker line. The whole check keeps to ``--budget`` seconds (6 minutes on a GPU): a part gets
at most what is left. ``--quick`` runs the same parts on the tiny models (tiny, tiny-xl) with a
few steps. Written under ``--out``, and nothing else: gpu_check.json (everything),
gpu-sections.md (the section for docs/benchmarks.md) and benchmarks.md (a copy of
docs/benchmarks.md with that section put between its gpu-check markers). The saved model, the
data home and the renders go to ``--work`` (a new temporary folder by default).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import DOC, machine_description  # noqa: E402
from benchmarks.gpu_parts import MARKER  # noqa: E402

PARTS_SCRIPT = ROOT / "benchmarks" / "gpu_parts.py"
START = "<!-- gpu-check:start -->"
END = "<!-- gpu-check:end -->"
# (part, seconds on a GPU, seconds in a --quick dry run, parts it needs)
PARTS = [
    ("gpu_tests", 120, 300, ()),
    ("save_folder", 100, 120, ()),
    ("fit_step", 90, 200, ()),
    ("autocast", 60, 120, ()),
    ("add", 120, 200, ("save_folder",)),
    ("render_1", 60, 120, ("add",)),
    ("render_8", 60, 120, ("add",)),
    ("diffusers", 60, 120, ("save_folder",)),
    ("serve", 90, 120, ("add",)),
    ("sdxl_step", 150, 200, ()),
]
MIN_START_S = 15  # a part is not started with less time than this left
GB = 10**9
TARGETS = {
    "fit_loop_s": 12.0, "add_s": 25.0, "gpu_bytes": 6 * GB, "render_8_per_image_s": 0.4,
    "render_1_s": 10.0, "serve_overhead_s": 0.5,
}


def run_part(name: str, argv: list[str], timeout: float, env: dict[str, str]) -> dict:
    """Run one part's process with a time limit; its record (status ok / failed / timeout)."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        status = None
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the part's whole process group
        out, err = proc.communicate()
        status = "timeout"
    seconds = time.perf_counter() - started
    result = None
    for line in reversed(out.splitlines()):
        if line.startswith(MARKER + " "):
            try:
                result = json.loads(line[len(MARKER) + 1:])
            except ValueError:
                pass
            break
    if status is None:
        ok = proc.returncode == 0 and result is not None and result.get("ok", True)
        status = "ok" if ok else "failed"
    record = {"part": name, "status": status, "seconds": round(seconds, 2),
              "timeout_s": round(timeout, 1), "returncode": proc.returncode, "result": result,
              "command": argv}
    if status != "ok":
        record["stderr_tail"] = err[-3000:]
        record["stdout_tail"] = out[-2000:]
    return record


def run_check(out_dir: Path, device: str, quick: bool, parts: list[str] | None = None,
              budget: float | None = None, timeouts: dict[str, float] | None = None,
              work: Path | None = None, echo=print) -> dict:
    """Run the parts (all, or those named), write gpu_check.json, gpu-sections.md and
    benchmarks.md under ``out_dir``; returns the report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Not under out_dir: the saved model (2 GB in fp16) and the renders are not results.
    work = work or Path(tempfile.mkdtemp(prefix="celebctl-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    budget = budget if budget is not None else (360.0 if device.startswith("cuda") else 1800.0)
    timeouts = timeouts or {}
    env = dict(os.environ, CELEBCTL_HOME=str(work / "home"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT),
                                                      os.environ.get("PYTHONPATH")) if p))
    arch = "tiny" if quick else "sd15"
    folder_dtype = "fp16" if device.startswith("cuda") else "fp32"
    env["CELEBCTL_FACE_WEIGHTS"] = str(work / f"{arch}-{folder_dtype}" / "vggface2-layout.pt")
    started = time.perf_counter()
    records: dict[str, dict] = {}
    for name, gpu_s, quick_s, needs in PARTS:
        if parts is not None and name not in parts:
            continue
        left = budget - (time.perf_counter() - started)
        limit = min(timeouts.get(name, quick_s if quick else gpu_s), left)
        missing = [n for n in needs if records.get(n, {}).get("status") != "ok"
                   and not (n == "save_folder" and _folder_ready(work, arch, folder_dtype))]
        if missing:
            record = {"part": name, "status": "skipped", "seconds": 0.0,
                      "reason": f"needs {', '.join(missing)}, which did not succeed"}
        elif limit < min(MIN_START_S, timeouts.get(name, MIN_START_S)):
            record = {"part": name, "status": "skipped", "seconds": 0.0,
                      "reason": f"budget: {max(left, 0):.0f} s left of {budget:.0f} s"}
        else:
            argv = [sys.executable, str(PARTS_SCRIPT), name, "--device", device,
                    "--work", str(work)] + (["--quick"] if quick else [])
            part_env = env
            if name == "gpu_tests":  # the tests set up their own data home and face weights
                part_env = {k: v for k, v in env.items()
                            if k not in ("CELEBCTL_HOME", "CELEBCTL_FACE_WEIGHTS")}
            record = run_part(name, argv, limit, part_env)
        records[name] = record
        peak = (record.get("result") or {}).get("peak_gpu_mib")
        echo(f"[gpu_check] {name}: {record['status']} in {record['seconds']:.1f} s"
             + (f", peak GPU {peak:.0f} MiB" if peak is not None else "")
             + (f" ({record['reason']})" if "reason" in record else ""))
    gpu = next((r["result"].get("gpu") for r in records.values()
                if r.get("result") and r["result"].get("gpu")), None)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device, "gpu": gpu, "quick": quick, "machine": machine_description(),
        "budget_s": budget, "total_s": round(time.perf_counter() - started, 2),
        "parts": records,
    }
    report["targets"] = evaluate_targets(records, measured_on_gpu=gpu is not None and not quick)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    section = markdown_section(report)
    (out_dir / "gpu-sections.md").write_text(section)
    (out_dir / "benchmarks.md").write_text(with_section(DOC.read_text(), section))
    return report


def _folder_ready(work: Path, arch: str, dtype: str) -> bool:
    return (work / f"{arch}-{dtype}" / "model_index.json").is_file()


def _figure(records: dict, part: str, key: str):
    record = records.get(part) or {}
    if record.get("status") != "ok":
        return None
    return (record.get("result") or {}).get(key)


def evaluate_targets(records: dict, measured_on_gpu: bool) -> list[dict]:
    """Each target with its figure and whether it is met (None: not measured, or a dry run)."""
    def seconds(part):
        record = records.get(part) or {}
        return record["seconds"] if record.get("status") == "ok" else None

    render_1, render_8 = seconds("render_1"), seconds("render_8")
    extra = (render_8 - render_1) / 7 if render_1 is not None and render_8 is not None else None
    diffusers_extra = _figure(records, "diffusers", "each_extra_image_s")
    peaks = {p: _figure(records, p, "peak_gpu_mib") for p in ("add", "render_1", "render_8")}
    known = [v for v in peaks.values() if v is not None]
    rows = [
        ("fit loop (400 steps, inside `add`: fit wall - pool)", "<= 12 s",
         _figure(records, "add", "fit_loop_s"), lambda v: v <= TARGETS["fit_loop_s"]),
        ("`celebctl add` end to end", "<= 25 s", seconds("add"),
         lambda v: v <= TARGETS["add_s"]),
        ("peak GPU memory of add / render -n 1 / render -n 8 (highest)", "<= 6 GB",
         max(known) * 2**20 / GB if len(known) == len(peaks) else None,
         lambda v: v * GB <= TARGETS["gpu_bytes"]),
        ("render n=8: each extra image ((n=8 - n=1) / 7, processes)", "<= 0.4 s", extra,
         lambda v: v <= TARGETS["render_8_per_image_s"]),
        ("render n=8 vs plain diffusers at batch 8: each extra image", "faster",
         extra / diffusers_extra if extra is not None and diffusers_extra else None,
         lambda v: v < 1.0),
        ("`celebctl render -n 1` end to end", "<= 10 s", render_1,
         lambda v: v <= TARGETS["render_1_s"]),
        ("`serve`: one image answered within its render time plus", "<= 0.5 s",
         _figure(records, "serve", "overhead_s"), lambda v: v <= TARGETS["serve_overhead_s"]),
    ]
    return [{"what": what, "target": target,
             "value": round(value, 4) if value is not None else None,
             "meets": (bool(test(value)) if value is not None else None)
             if measured_on_gpu else None}
            for what, target, value, test in rows]


def _cell(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _detail(name: str, result: dict) -> str:
    """The part's main figures, in a table cell."""
    r = result or {}
    if name == "gpu_tests":
        return ", ".join(f"{k} {r[k]}" for k in ("passed", "failed", "skipped", "error")
                         if r.get(k))
    if name == "save_folder":
        return f"{r.get('mib')} MiB, {r.get('dtype')}"
    if name == "fit_step":
        eager = r.get("eager_s_per_step")
        return (f"{r.get('model_from')} bf16 {r.get('resolution')} px batch {r.get('batch')}: "
                f"captured {_cell(r.get('celebctl_s_per_step'), 4)} s/step "
                f"(graph: {r.get('celebctl_captured')}), eager {_cell(eager, 4)}, reference "
                f"{_cell(r.get('reference_s_per_step'), 4)}; {r.get('steps')} timed steps")
    if name == "autocast":
        return (f"{r.get('model')} batch 2, {r.get('latent_side')}x{r.get('latent_side')} "
                f"latents: autocast on {r.get('ms_autocast_on')} ms, off "
                f"{r.get('ms_autocast_off')} ms (on/off {r.get('on_over_off')})")
    if name == "add":
        return (f"fit {r.get('steps')} steps ({r.get('dtype')}): wall {_cell(r.get('fit_wall_s'))}"
                f" s, pool {_cell(r.get('fit_pool_s'))} s, loop {_cell(r.get('fit_loop_s'))} s, "
                f"graph: {r.get('captured')}")
    if name in ("render_1", "render_8"):
        return (f"{r.get('n')} image(s), batch {r.get('batch')}, {r.get('steps')} steps; "
                f"graphs captured: {r.get('graphs_captured')}; render_prompt "
                f"{_cell(r.get('elapsed_in_render_s'))} s")
    if name == "diffusers":
        return (f"{r.get('dtype')}, {r.get('steps')} steps: 1 image {_cell(r.get('images_1_s'))}"
                f" s, 8 at batch 8 {_cell(r.get('images_8_s'))} s, each extra image "
                f"{_cell(r.get('each_extra_image_s'), 3)} s (load excluded)")
    if name == "serve":
        return (f"{r.get('steps')} steps, {r.get('size')} px: answered in "
                f"{_cell(r.get('warm_s'))} s, render {_cell(r.get('render_s'))} s, overhead "
                f"{_cell(r.get('overhead_s'), 3)} s")
    if name == "sdxl_step":
        return (f"{r.get('model')} bf16 {r.get('resolution')} px batch 2: "
                f"{_cell(r.get('s_per_step'), 4)} s/step, graph: {r.get('captured')}")
    return ""


def markdown_section(report: dict) -> str:
    """The docs/benchmarks.md section for this run (title, tables, how it was run)."""
    dry = report["quick"] or report["gpu"] is None
    title = (f"## GPU check: {report['gpu']}" if not dry else
             f"## GPU check (dry run: {report['device']}, tiny models; not GPU figures)")
    lines = [title, "", f"{report['date']}; machine: {report['machine']}; "
             f"total {report['total_s']:.0f} s of a {report['budget_s']:.0f} s budget.", "",
             "| part | status | seconds | peak GPU MiB | figures |", "|---|---|---|---|---|"]
    for name, record in report["parts"].items():
        result = record.get("result") or {}
        status = record["status"] + (f" ({record['reason']})" if "reason" in record else "")
        figures = _detail(name, result) if record["status"] == "ok" else (
            (result.get("error") or record.get("stderr_tail") or "").strip().splitlines()[-1:]
            or [""])[0][:160]
        if not isinstance(figures, str):
            figures = str(figures)
        lines.append(f"| {name} | {status} | {record['seconds']:.1f} | "
                     f"{_cell(result.get('peak_gpu_mib'), 0)} | {figures.replace('|', '/')} |")
    lines += ["", "| target | goal | measured | meets |", "|---|---|---|---|"]
    for t in report["targets"]:
        meets = {True: "yes", False: "no", None: "-"}[t["meets"]]
        lines.append(f"| {t['what']} | {t['target']} | {_cell(t['value'], 3)} | {meets} |")
    lines += ["", "Seconds are whole processes (start-up and model loading included). Peak GPU "
              "memory is torch.cuda.max_memory_allocated in the part's process. The autocast "
              "part times the bare UNet with bf16 weights, forward and backward to the text "
              "states as in the fit, with torch.autocast(bf16) on (what the fit does) and off; "
              "it says what autocast costs or saves around an already-bf16 UNet, not the "
              "fit step. Run: `python3 benchmarks/gpu_check.py --out OUT"
              + (f" --device {report['device']} --quick" if report["quick"] else "") + "`."]
    if dry:
        lines += ["", "A dry run shows that every part runs; its figures are not GPU figures "
                  "and the targets are not judged."]
    return "\n".join(lines) + "\n"


def with_section(doc: str, section: str) -> str:
    """``doc`` with ``section`` between the gpu-check markers (appended with them if absent)."""
    block = f"{START}\n{section.rstrip()}\n{END}"
    if START in doc and END in doc and doc.index(START) < doc.index(END):
        head, rest = doc.split(START, 1)
        return head + block + rest.split(END, 1)[1]
    return doc.rstrip() + "\n\n" + block + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the JSON and markdown")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps")
    parser.add_argument("--parts", nargs="+", choices=[p[0] for p in PARTS],
                        help="only these parts (default: all)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole check (default 360 on CUDA, 1800 else)")
    parser.add_argument("--timeout", action="append", default=[], metavar="PART=SECONDS",
                        help="another time limit for one part (repeatable)")
    parser.add_argument("--work", default=None,
                        help="working folder: saved model, data home, renders (default: a new "
                             "temporary folder)")
    args = parser.parse_args()
    timeouts = {}
    for item in args.timeout:
        name, _, value = item.partition("=")
        if name not in {p[0] for p in PARTS} or not value:
            parser.error(f"--timeout {item}: use PART=SECONDS with a known part")
        timeouts[name] = float(value)
    report = run_check(Path(args.out), args.device, args.quick, args.parts, args.budget,
                       timeouts, Path(args.work) if args.work else None)
    print()
    print((Path(args.out) / "gpu-sections.md").read_text())
    failed = [n for n, r in report["parts"].items() if r["status"] != "ok"]
    print(f"[gpu_check] {len(report['parts']) - len(failed)} of {len(report['parts'])} parts "
          f"ok in {report['total_s']:.0f} s" + (f"; not ok: {', '.join(failed)}" if failed
                                                  else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
