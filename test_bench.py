"""Tests of bench.py's device check (gpu_check.py): the CPU dry run that proves it before a GPU sees it,
its deadline and its exit status."""
import json
import subprocess
import sys
from pathlib import Path

import gpu_check

REPO = Path(__file__).resolve().parent


def test_cpu_dry_run_passes_its_correctness_rows(tmp_path):
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, "bench.py", "gpu", "--device", "cpu", "--size", "tiny", "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {row[0] for row in gpu_check.ROWS}
    assert all(set(row) == {"check", "value", "expect", "status"} for row in rows.values())
    a_rows = {i: r["status"] for i, r in rows.items() if i.startswith("A")}
    assert len(a_rows) == 8 and set(a_rows.values()) == {"PASS"}, a_rows
    cuda_only = {row[0] for row in gpu_check.ROWS if row[4]}
    assert {rows[i]["status"] for i in cuda_only} == {"SKIP"}
    # every other row ran (nothing left to the deadline) and the summary table was printed
    assert all(r["status"] in ("PASS", "INFO") for i, r in rows.items() if i not in cuda_only | {"C9"})
    assert "F    INFO" in r.stdout


def _fake_rows(monkeypatch, rows):
    monkeypatch.setattr(gpu_check, "ROWS", [(i, f"check {i}", "x", fn, False) for i, fn in rows])


def _run(tmp_path, deadline=60.0):
    parser = gpu_check.argparse.ArgumentParser()
    gpu_check.add_args(parser)
    out = tmp_path / "rows.json"
    args = parser.parse_args(["--device", "cpu", "--size", "tiny", "--json", str(out), "--deadline", str(deadline)])
    return gpu_check.run(args), json.loads(out.read_text())["rows"]


def test_exit_status_follows_the_correctness_and_ddp_rows(tmp_path, monkeypatch):
    def boom(ctx):
        raise RuntimeError("device lost\nsecond line")
    _fake_rows(monkeypatch, [("A1", lambda c: ("1e-7", "PASS")), ("B1", boom), ("C1", lambda c: ("slow", "WARN"))])
    code, rows = _run(tmp_path)
    assert code == 0  # a broken speed row is reported, not fatal
    assert rows["B1"]["status"] == "FAIL" and rows["B1"]["value"] == "RuntimeError: device lost"
    for failing in ("A1", "D2"):
        _fake_rows(monkeypatch, [(failing, boom), ("B1", lambda c: ("1 ms", "INFO"))])
        code, rows = _run(tmp_path)
        assert code == 1 and rows[failing]["status"] == "FAIL" and rows["B1"]["status"] == "INFO"


def test_deadline_stops_a_running_row_and_skips_the_rest(tmp_path, monkeypatch):
    def forever(ctx):
        while True:
            pass
    _fake_rows(monkeypatch, [("A1", lambda c: ("ok", "PASS")), ("B1", forever), ("C1", lambda c: ("1 ms", "INFO"))])
    code, rows = _run(tmp_path, deadline=1.0)
    assert code == 0
    assert [rows[i]["status"] for i in ("A1", "B1", "C1")] == ["PASS", "SKIP (time)", "SKIP (time)"]


def test_cuda_request_without_cuda_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    parser = gpu_check.argparse.ArgumentParser()
    gpu_check.add_args(parser)
    assert gpu_check.run(parser.parse_args([])) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "--device cpu --size tiny" in err and err.count("\n") == 1
