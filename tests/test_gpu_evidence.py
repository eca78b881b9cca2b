"""benchmarks/gpu_evidence.py: the plan, the budgets, the kill, the JSON lines, the digests.

The fast tests drive the runner with stand-in parts (short Python children); the slow one runs
the whole ``--quick`` rehearsal, every real part at toy size on the CPU (about 2 minutes).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_evidence as ge  # noqa: E402
import gpu_evidence_core as core  # noqa: E402

PY = sys.executable


def _ctx(tmp_path: Path, *, quick: bool = True, budget_s: float = 120.0) -> ge.Context:
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    return ge.Context(
        quick=quick,
        device="cpu" if quick else "cuda",
        out=out,
        work=work,
        wheels=tmp_path / "no-wheels",
        data=tmp_path / "no-data",
        grid_jobs=2,
        grid_epochs=None,
        budget_s=budget_s,
        log=io.StringIO(),
        env=ge.child_env(None, tmp_path / "no-data"),
        command="gpu_evidence.py --test",
    )


def _writer(path: Path, payload: dict) -> list[str]:
    return [PY, "-c", f"import json, pathlib; pathlib.Path({str(path)!r}).write_text("
            f"json.dumps({payload!r}))"]  # fmt: skip


def _digest(ctx: ge.Context, path: Path) -> tuple[dict, list[ge.Goal]]:
    figures = json.loads(path.read_text())
    return figures, [ge.Goal("x", "value small", "< 2", figures["v"], "x", figures["v"] < 2)]


# -- plan and budget ------------------------------------------------------------------------------


def test_parts_in_the_issues_order_and_the_gpu_plan_fits_one_device_call(tmp_path: Path) -> None:
    names = [p.name for p in ge.plan(_ctx(tmp_path, quick=False))]
    assert names == ["install", "environment", "matching", "openclip_step", "small_gpu",
                     "augment", "gpu_tests", "robustness"]  # fmt: skip
    parts = ge.plan(_ctx(tmp_path, quick=False))
    fixed, least = ge.planned_seconds(parts, ge.DEFAULT_BUDGET_S)
    assert ge.DEFAULT_BUDGET_S <= 540  # 9 minutes: one 10-minute call, with the transfers
    assert fixed + least + ge.RESERVE_S <= ge.DEFAULT_BUDGET_S
    assert least >= 120  # the grid keeps two minutes even if every part runs to its budget
    assert ge.planned_seconds(parts, 5000)[1] == ge.ROBUSTNESS_CAP_S == 480


def test_gpu_sizes_are_the_issues(tmp_path: Path) -> None:
    parts = {p.name: p for p in ge.plan(_ctx(tmp_path, quick=False))}
    step = " ".join(parts["openclip_step"].argv)
    assert "--model ViT-B-32 --batch 256 --precision bf16 --pool 65536" in step
    assert "--matcher-precision fp32 bf16" in step and "--device cuda" in step
    assert "--shapes full" in " ".join(parts["matching"].argv)
    assert "--model small-gpu" in " ".join(parts["small_gpu"].argv)
    assert "--batch 256 --size 224" in " ".join(parts["augment"].argv)
    tests = parts["gpu_tests"].argv
    assert tests[tests.index("-m", 2) + 1] == "gpu" and "tests/test_matching_cuda.py" in tests


def test_grid_goes_through_the_benchmarks_command_line(tmp_path: Path) -> None:
    argv = ge.grid_argv(_ctx(tmp_path, quick=False), tmp_path / "r", [0, 1])
    line = " ".join(argv)
    assert "--device cuda --datasets mnist fashion-mnist --seeds 0 1 --rates 0.001 0.01" in line
    assert "--variants clip roclip robust safeclip floor --ablations --ablation-rates" in line
    assert "--quick" not in argv and "--epochs" not in argv
    assert ge.grid_argv(_ctx(tmp_path), tmp_path / "r", [0])[-1] == "--quick"


def test_more_seeds_only_as_far_as_the_first_seeds_pace_allows() -> None:
    assert ge.extra_seeds(100, 250, 1) == 2
    assert ge.extra_seeds(100, 150, 1) == 1
    assert ge.extra_seeds(100, 105, 1) == 0  # 10% margin
    assert ge.extra_seeds(100, 1000, 2) == 1  # never past three seeds
    assert ge.extra_seeds(0, 10, 1) == 2


def test_plan_is_printed_with_its_total(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert ge.main(["--out", str(tmp_path / "o"), "--plan", "--work", str(tmp_path / "w")]) == 0
    printed = capsys.readouterr().out
    assert "at most 510 s in all (8.5 min)" in printed and "7 robustness" in printed


def test_parts_subset_keeps_the_install_first(tmp_path: Path) -> None:
    parts = ge.select(ge.plan(_ctx(tmp_path)), "robustness,matching")
    assert [p.name for p in parts] == ["install", "matching", "robustness"]
    with pytest.raises(SystemExit, match="unknown part"):
        ge.select(ge.plan(_ctx(tmp_path)), "nope")


# -- children, budgets, records -----------------------------------------------------------------


def test_a_part_over_its_budget_is_killed_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time, pathlib;"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(c.pid)); print('started', flush=True);"
        "time.sleep(60)"
    )
    log = io.StringIO()
    start = time.monotonic()
    result = ge.run_command([PY, "-c", code], 2.0, ge.child_env(None, tmp_path), log)
    assert result.timed_out and result.rc is None
    assert time.monotonic() - start < 20
    assert "started" in log.getvalue() and result.tail == ["started"]
    stat = Path(f"/proc/{pid_file.read_text()}/stat")
    time.sleep(0.5)
    assert not stat.exists() or stat.read_text().split(")")[1].split()[0] == "Z"


def test_each_part_appends_its_json_line_and_rewrites_the_summary(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    parts = [
        ge.Part("good", "writes its figures", 30, _writer(ctx.work / "g.json", {"v": 1}),
                "g.json", _digest),
        ge.Part("bad", "exits 3", 30, [PY, "-c", "import sys; sys.exit(3)"], "b.json", _digest),
        ge.Part("slow", "overruns", 1.5, [PY, "-c", "import time; time.sleep(30)"], "s.json"),
        ge.Part("mute", "writes nothing", 30, [PY, "-c", "pass"], "m.json", _digest),
    ]  # fmt: skip
    assert ge.run_all(ctx, parts) == 1
    lines = [json.loads(x) for x in (ctx.out / "evidence.jsonl").read_text().splitlines()]
    assert [(r["part"], r["status"]) for r in lines] == [
        ("good", "ok"), ("bad", "failed"), ("slow", "timeout"), ("mute", "failed")
    ]  # fmt: skip
    assert lines[0]["figures"] == {"v": 1} and lines[0]["goals"][0]["met"] is True
    assert lines[1]["rc"] == 3 and "killed at its budget" in lines[2]["note"]
    summary = json.loads((ctx.out / "summary.json").read_text())
    assert summary["evidence"] is False and [p["part"] for p in summary["parts"]] == [
        "good", "bad", "slow", "mute"
    ]  # fmt: skip
    md = (ctx.out / "evidence.md").read_text()
    assert "REHEARSAL, NOT EVIDENCE" in md and "| value small | < 2 | 1.00 x | met |" in md


def test_a_part_with_no_time_left_is_skipped_not_started(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, budget_s=ge.RESERVE_S + 2)
    marker = tmp_path / "ran"
    part = ge.Part("late", "too late", 60, [PY, "-c", f"open({str(marker)!r}, 'w')"], "x.json")
    record = ge.run_part(ctx, part, 0)
    assert record["status"] == "skipped" and not marker.exists()


def test_without_cuda_the_evidence_stops_after_the_environment(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, quick=False)
    env_json = {"device": "x86_64 CPU", "cuda": {"available": False}}
    parts = [
        ge.Part("environment", "env", 30, _writer(ctx.work / "e.json", env_json), "e.json",
                ge.digest_environment),
        ge.Part("matching", "never", 30, [PY, "-c", "raise SystemExit(9)"], "m.json"),
    ]  # fmt: skip
    assert ge.run_all(ctx, parts) == 3
    summary = json.loads((ctx.out / "summary.json").read_text())
    assert summary["not_run"] == ["matching"] and summary["evidence"] is True


def test_child_env_puts_wheels_then_the_tree_first_and_finds_the_data(tmp_path: Path) -> None:
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    env = ge.child_env(tmp_path / "site", tmp_path / "data", {"PYTHONPATH": "/old"})
    paths = env["PYTHONPATH"].split(":")
    assert paths[0] == str(tmp_path / "site") and paths[-1] == "/old"
    assert paths[1:3] == [str(core.REPO), str(core.REPO / "integrations")]
    assert env["ROCLIP_MNIST_DIR"] == str(tmp_path / "data" / "mnist")
    assert "ROCLIP_FASHION_MNIST_DIR" not in env and env["HF_HUB_OFFLINE"] == "1"
    kept = ge.child_env(None, tmp_path / "data", {"ROCLIP_MNIST_DIR": "/mine"})
    assert kept["ROCLIP_MNIST_DIR"] == "/mine"


def test_two_versions_of_one_wheel_are_refused_before_pip_runs(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    ctx.wheels.mkdir()
    for name in ("open_clip_torch-3.3.0-py3-none-any.whl", "open_clip_torch-3.2.0-py3-none-any.whl",
                 "ftfy-6.3.1-py3-none-any.whl"):  # fmt: skip
        (ctx.wheels / name).write_bytes(b"")
    record = ge.run_install(ctx, ge.plan(ctx)[0], 30)
    assert record["status"] == "failed" and "open-clip-torch" in record["note"]
    assert not (ctx.work / "site").exists()


# -- digests --------------------------------------------------------------------------------------


def test_matching_goal_reads_the_better_exact_path(tmp_path: Path) -> None:
    rows = [
        {"batch": 256, "pool": 65536, "dim": 512, "match_fp32_vs_bf16_matmul": 2.0,
         "match_bf16_vs_bf16_matmul": 1.2},
        {"batch": 4096, "pool": 1048576, "dim": 1024, "match_fp32_vs_bf16_matmul": 1.6,
         "match_bf16_vs_bf16_matmul": 1.4},
    ]  # fmt: skip
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"rows": rows}))
    _, goals = ge.digest_matching(_ctx(tmp_path), path)
    assert [(g.value, g.met) for g in goals] == [(1.2, True), (1.4, False)]
    assert "bf16 search" in goals[0].note and "4,096 x 1,048,576 x 1,024" in goals[1].goal


def test_step_overheads_and_the_augmentation_share_of_the_step(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    kinds = {
        "clip": {"median_ms": 80.0},
        "roclip_fp32": {"median_ms": 81.0, "overhead_ms": 1.0, "overhead_pct": 1.25},
        "roclip_bf16": {"median_ms": 80.4, "overhead_ms": 0.4, "overhead_pct": 0.5},
    }
    step = {"model": "ViT-B-32", "batch": 256, "precision": "bf16", "clip_spread_ms": 0.3,
            "kinds": kinds}  # fmt: skip
    (tmp_path / "s.json").write_text(json.dumps(step))
    _, goals = ge.digest_step(ctx, tmp_path / "s.json")
    assert [(g.value, g.met) for g in goals] == [(1.25, False), (0.5, True)]
    augment = {"device": "cuda", "batched": {"batch": 256, "size": 224, "ms": 2.0}}
    (tmp_path / "a.json").write_text(json.dumps(augment))
    _, (goal,) = ge.digest_augment(ctx, tmp_path / "a.json")
    assert goal.met is None  # no step measured yet
    ctx.records.append({"part": "openclip_step", "status": "ok", "figures": step})
    figures, (goal,) = ge.digest_augment(ctx, tmp_path / "a.json")
    assert goal.value == figures["share_of_step_pct"] == 2.5 and goal.met is True


def test_junit_counts_and_the_tests_goal(tmp_path: Path) -> None:
    xml = """<testsuites><testsuite name="pytest" tests="4">
      <testcase classname="tests.test_pool" name="test_cuda_round_trip"/>
      <testcase classname="tests.test_a" name="test_b"><failure message="x"/></testcase>
      <testcase classname="tests.test_a" name="test_c"><skipped message="y"/></testcase>
      <testcase classname="tests.test_a" name="test_d"><error message="z"/></testcase>
    </testsuite></testsuites>"""
    (tmp_path / "j.xml").write_text(xml)
    figures, (goal,) = ge.digest_tests(_ctx(tmp_path), tmp_path / "j.xml")
    assert (figures["passed"], figures["failed"], figures["errors"], figures["skipped"]) == (
        1, 1, 1, 1
    )  # fmt: skip
    assert goal.met is False and figures["failed_tests"] == ["tests.test_a::test_b",
                                                            "tests.test_a::test_d"]  # fmt: skip
    (tmp_path / "k.xml").write_text('<testsuite><testcase classname="a" name="b">'
                                    '<skipped/></testcase></testsuite>')  # fmt: skip
    assert ge.digest_tests(_ctx(tmp_path), tmp_path / "k.xml")[1][0].met is None  # all skipped


def test_grid_rows_from_finished_runs_and_their_table(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    for seed, zs in ((0, 0.9), (1, 0.8)):
        row = {"dataset": "mnist", "rate": 0.001, "variant": "roclip", "seed": seed,
               "zero_shot": zs, "backdoor_asr": 0.0, "zero_shot_by_epoch": {"1": 0.5}}  # fmt: skip
        (runs / f"mnist-s{seed}-r0.001-roclip.json").write_text(json.dumps(row))
    (runs / "torn.json").write_text("{")  # written when the stage was killed
    rows = ge.collect_rows(tmp_path)
    assert len(rows) == 2 and "zero_shot_by_epoch" not in rows[0]
    table = ge.grid_table(rows)
    assert "| mnist | 0.1% | roclip | 2 | 85.0 ± 7.1 | - | 0.0 ± 0.0 |" in table
    assert ge.grid_table([]) == "(no run finished)"


def test_gpu_test_files_are_the_ones_with_the_mark() -> None:
    files = ge.gpu_test_files()
    assert "tests/test_matching_cuda.py" in files and "tests/test_pool.py" in files
    assert "tests/test_gpu_evidence.py" not in files and "tests/test_config.py" not in files
    # the GPU image has no faiss: the module that imports it must not be collected there
    assert "tests/test_matching.py" not in files


# -- the rehearsal ------------------------------------------------------------------------------


@pytest.mark.slow
def test_quick_rehearsal_runs_every_part(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [PY, str(BENCH / "gpu_evidence.py"), "--quick", "--out", str(out),
            "--work", str(work), "--wheels", str(tmp_path / "no-wheels")]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(core.OUT_FILES)
    records = [json.loads(x) for x in (out / "evidence.jsonl").read_text().splitlines()]
    status = {r["part"]: r["status"] for r in records}
    assert status.pop("install") == "skipped"
    assert set(status.values()) == {"ok"} and len(status) == 7
    grid = records[-1]["figures"]
    assert grid["runs_finished"] == grid["runs_planned"] == 5
    assert "REHEARSAL, NOT EVIDENCE" in (out / "evidence.md").read_text()
    assert "plan: CPU rehearsal" in done.stdout
