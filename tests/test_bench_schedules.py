"""Smoke test of `python -m minread.bench schedules` with the DiT itself as the model."""

import json

from minread.bench import schedules


def test_schedules_bench_runs_the_dit(capsys):
    schedules.main(["--seconds", "4", "--overhead-seconds", "1", "--model", "dit", "--repeats", "1"])
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["async_over_overlap_calls_per_s_long_run"] <= 0.5 + 1e-9      # 1/W in the long run
    assert set(figures["overhead"]) >= {"synchronous", "synchronous_overlap", "asynchronous"}
    assert all(row["calls"] > 0 for row in figures["overhead"].values())
