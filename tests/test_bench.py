"""Smoke tests of `python -m dpbp.bench`: it runs, alone and under mpirun, and prints its table / JSON.

No timing is asserted (timing goals belong to the benchmark's output, not to tests): only that every
promised row and column is there and the numbers are positive.
"""

from __future__ import annotations

import json

QUICK = ["--spec", "2-2-2", "--spec", "64-128-64-10", "--repeats", "2", "--scale-steps", "0.02", "--threads", "1"]


def json_rows(stdout):
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [r for r in rows if "spec" in r], [r for r in rows if "peak_rss_mb_per_rank" in r]


def test_bench_prints_a_table_with_dpbp_and_gemm_bound_rows(run_cli):
    proc = run_cli("bench", *QUICK, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("spec "))
    assert "samples/s median (min-max)" in lines[head] and "of GEMM" in lines[head]
    body = lines[head + 2:]
    for spec in ("2-2-2", "64-128-64-10"):
        assert any(line.startswith(spec) and " dpbp " in f" {line} " for line in body)
        assert any(line.startswith(spec) and "GEMM bound" in line for line in body)
    assert "machine:" in proc.stdout and "kernel" in proc.stdout
    assert "peak RSS" in proc.stdout


def test_bench_json_has_medians_ranges_and_the_gemm_ratio(run_cli):
    proc = run_cli("bench", *QUICK, "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows, rss = json_rows(proc.stdout)
    dpbp = [r for r in rows if r["variant"] == "dpbp"]
    assert {r["spec"] for r in dpbp} == {"2-2-2", "64-128-64-10"}
    for r in dpbp:
        s = r["step_s"]
        assert 0 < s["min"] <= s["median"] <= s["max"] and r["repeats"] == 2
        assert r["samples_per_s"]["median"] > 0 and r["of_gemm"] > 0
    assert rss and all(m > 0 for m in rss[0]["peak_rss_mb_per_rank"])


def test_bench_under_mpirun_reports_communication(run_cli):
    proc = run_cli("bench", "--spec", "64-128-64-10", "--repeats", "1", "--scale-steps", "0.02", "--json",
                   "--bucket-mb", "0.01", ranks=2, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows, rss = json_rows(proc.stdout)
    variants = {r["variant"]: r for r in rows}
    assert {"dpbp", "dpbp, buckets 0.01 MB", "GEMM bound", "dpbp, rank 0 alone"} <= set(variants)
    for v in ("dpbp", "dpbp, buckets 0.01 MB"):
        for key in ("exposed_comm_s", "reducer_alone_s", "raw_allreduce_s"):
            assert variants[v][key]["median"] > 0
    assert variants["dpbp"]["ranks"] == 2 and variants["dpbp, rank 0 alone"]["ranks"] == 1
    assert "vs_rank0_alone" in variants["dpbp"]
    assert len(rss[0]["peak_rss_mb_per_rank"]) == 2


def test_bench_rejects_bad_thread_counts_with_one_message(run_cli):
    proc = run_cli("bench", "--threads", "0", "--repeats", "1")
    assert proc.returncode == 2
    assert proc.stderr.count("--threads") == 1 and "Traceback" not in proc.stderr
