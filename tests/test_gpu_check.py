"""benchmarks/gpu_check.py, dry-run on the CPU: parts in their own processes with their own
time limits, failures recorded without losing the rest, the JSON and the markdown written.
The full dry run (every part, tiny models) takes minutes on a CPU and is marked slow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_fit, gpu_check
from benchmarks.gpu_parts import MARKER

ROOT = Path(__file__).resolve().parent.parent


def test_a_part_that_hangs_is_stopped_and_one_that_fails_keeps_its_stderr(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    hang = gpu_check.run_part(
        "hang", [sys.executable, "-c", "import time; print('started', flush=True); "
                 "time.sleep(3600)"], 1.0, env)
    # Stopped, not waited out: the part sleeps an hour (a wide margin for a busy machine).
    assert hang["status"] == "timeout" and hang["seconds"] < 900
    assert hang["result"] is None and "started" in hang["stdout_tail"]
    fail = gpu_check.run_part(
        "fail", [sys.executable, "-c", "import sys; sys.stderr.write('x' * 5000 + 'boom'); "
                 "sys.exit(3)"], 30.0, env)
    assert fail["status"] == "failed" and fail["returncode"] == 3
    assert fail["stderr_tail"].endswith("boom") and len(fail["stderr_tail"]) == 3000
    good = gpu_check.run_part(
        "good", [sys.executable, "-c", f"print('noise'); print('{MARKER} ' + "
                 "'{\"peak_gpu_mib\": 12.5, \"x\": 1}')"], 30.0, env)
    assert good["status"] == "ok" and good["result"] == {"peak_gpu_mib": 12.5, "x": 1}
    # A part that says it failed (ok false on its marker line) is a failure even at exit 0.
    said = gpu_check.run_part(
        "said", [sys.executable, "-c", f"print('{MARKER} ' + '{{\"ok\": false}}')"], 30.0, env)
    assert said["status"] == "failed"


def test_a_dry_run_of_some_parts_writes_the_json_and_the_markdown(tmp_path):
    out = tmp_path / "out"
    lines: list[str] = []
    report = gpu_check.run_check(out, "cpu", quick=True,
                                 parts=["save_folder", "autocast", "add", "render_1"],
                                 timeouts={"save_folder": 1.0}, work=tmp_path / "work",
                                 echo=lines.append)
    assert sorted(p.name for p in out.iterdir()) == ["benchmarks.md", "gpu-sections.md",
                                                      "gpu_check.json"]
    parts = report["parts"]
    assert list(parts) == ["save_folder", "autocast", "add", "render_1"]
    # The save ran out of time; the autocast part still ran (on the built-in tiny model), and
    # the parts that need the saved folder were skipped, each saying why.
    assert parts["save_folder"]["status"] == "timeout", parts["save_folder"]
    assert parts["save_folder"]["timeout_s"] == 1.0
    assert parts["autocast"]["status"] == "ok", parts["autocast"]
    autocast = parts["autocast"]["result"]
    assert autocast["ms_autocast_on"] > 0 and autocast["ms_autocast_off"] > 0
    assert autocast["peak_gpu_mib"] is None and autocast["max_rss_mib"] > 0  # no CUDA here
    assert autocast["model"] == "tiny"
    assert parts["add"]["status"] == "skipped" and "needs save_folder" in parts["add"]["reason"]
    assert parts["render_1"]["status"] == "skipped" and "needs add" in parts["render_1"]["reason"]
    assert len(lines) == 4 and lines[0].startswith("[gpu_check] save_folder: timeout")

    saved = json.loads((out / "gpu_check.json").read_text())
    assert saved["parts"]["autocast"]["result"] == autocast
    assert saved["gpu"] is None and saved["quick"] is True
    # Targets are never judged on a dry run; those without a figure say so.
    assert all(t["meets"] is None for t in saved["targets"])
    assert all(t["value"] is None for t in saved["targets"])  # add and renders did not run
    section = (out / "gpu-sections.md").read_text()
    assert section.startswith("## GPU check (dry run: cpu, tiny models; not GPU figures)")
    assert "| save_folder | timeout |" in section
    assert "| render_1 | skipped (needs add" in section
    doc = (out / "benchmarks.md").read_text()
    assert doc.count(gpu_check.START) == 1 and doc.count(gpu_check.END) == 1
    assert section.strip() in doc
    assert doc.startswith("# Benchmarks")  # the rest of docs/benchmarks.md is kept


def test_the_section_replaces_what_is_between_the_markers():
    doc = f"# B\n\n## A\n\ntext\n\n{gpu_check.START}\nold\n{gpu_check.END}\n\n## C\n\nmore\n"
    new = gpu_check.with_section(doc, "## GPU check: H200\n\nnew\n")
    assert "old" not in new and "new" in new
    assert new.startswith("# B\n\n## A\n\ntext\n\n") and new.endswith("\n\n## C\n\nmore\n")
    assert gpu_check.with_section(new, "## again\n").count(gpu_check.START) == 1
    appended = gpu_check.with_section("# B\n", "## GPU check: H100\n")
    assert appended.endswith(f"{gpu_check.START}\n## GPU check: H100\n{gpu_check.END}\n")


def test_the_shipped_doc_has_the_markers_once():
    doc = gpu_check.DOC.read_text()
    assert doc.count(gpu_check.START) == 1 and doc.count(gpu_check.END) == 1
    assert doc.index(gpu_check.START) < doc.index(gpu_check.END)


def test_targets_are_judged_on_a_gpu_run_only():
    def ok(seconds, **result):
        return {"status": "ok", "seconds": seconds, "result": result}

    records = {"add": ok(20.0, fit_loop_s=11.0, peak_gpu_mib=5000.0),
               "render_1": ok(9.0, peak_gpu_mib=3000.0),
               "render_8": ok(11.1, peak_gpu_mib=5800.0),
               "diffusers": ok(30.0, each_extra_image_s=0.5)}
    judged = {t["target"]: t for t in gpu_check.evaluate_targets(records, measured_on_gpu=True)}
    assert judged["<= 12 s"]["meets"] is True and judged["<= 25 s"]["meets"] is True
    assert judged["<= 6 GB"]["value"] == pytest.approx(5800 * 2**20 / 1e9, abs=1e-4)
    assert judged["<= 6 GB"]["meets"] is False  # 6.08 GB
    assert judged["<= 0.4 s"]["value"] == pytest.approx(0.3) and judged["<= 0.4 s"]["meets"]
    assert judged["faster"]["value"] == pytest.approx(0.6) and judged["faster"]["meets"]
    assert judged["<= 10 s"]["meets"] is True
    records["render_8"]["status"] = "failed"
    judged = {t["target"]: t for t in gpu_check.evaluate_targets(records, measured_on_gpu=True)}
    assert judged["<= 0.4 s"]["meets"] is None and judged["<= 6 GB"]["meets"] is None


def test_bench_fit_times_only_steps_after_warm_up_and_capture():
    from celebctl.fitstep import WARMUP_STEPS
    from celebctl.fitting import REPORT_EVERY_GPU

    assert bench_fit.untimed_lead("cpu") == 1
    lead = bench_fit.untimed_lead("cuda")
    # The first loss report on CUDA comes after the eager warm-up steps and the capture.
    assert lead > WARMUP_STEPS and lead % REPORT_EVERY_GPU == 0
    # --steps below 1 is refused before anything loads.
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_fit.py"),
                           "--steps", "0", "--device", "cuda"], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)
    assert done.returncode == 2 and "--steps must be at least 1" in done.stderr


def test_bench_fit_loop_reports_a_positive_step_time(tiny_home):
    from celebctl import basis, faces, models
    from tests.helpers import PHOTO

    components = models.load_pipeline_components("tiny", "cpu", "fp32")
    loaded = basis.load_basis(basis.ensure_basis("tiny").id)
    face = faces.prepare_face(PHOTO).aligned
    encoder = faces.load_face_encoder("random-init")
    per_step, pool_s, captured = bench_fit.celebctl_loop(
        components, loaded.mean, loaded.components, face, encoder, 1, 2, 1e-2, 0, 64, 1)
    assert per_step > 0 and pool_s > 0 and captured is False


@pytest.mark.slow
def test_the_whole_dry_run(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"),
                           "--device", "cpu", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["status"] for r in report["parts"].values()] == ["ok"] * len(gpu_check.PARTS)
    assert report["parts"]["add"]["result"]["steps"] == 10
    assert report["parts"]["render_8"]["result"]["n"] == 8
    assert "9 of 9 parts ok" in done.stdout
