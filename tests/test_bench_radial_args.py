"""``experiments/bench_radial.py``'s ``--only``: some rows of the benchmark, never over a committed result."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import bench_radial  # noqa: E402


def test_only_runs_the_chosen_kinds_of_job_and_every_job_of_them(tmp_path):
    whole = bench_radial.planned_jobs(bench_radial.parse_args([]))
    args = bench_radial.parse_args(["--only", "prefill_fitted", "decode", "--out", str(tmp_path / "some.json")])
    assert bench_radial.planned_jobs(args) == [job for job in whole if job[0] in ("prefill_fitted", "decode")]
    assert {kind for kind, _ in whole} == set(bench_radial.JOB_KINDS)  # every kind can be chosen


@pytest.mark.parametrize("out", [None, str(ROOT / "results" / "bench_radial_125m.json")])
def test_only_refuses_to_write_where_a_whole_run_is_committed(out, capsys):
    with pytest.raises(SystemExit):
        bench_radial.parse_args(["--only", "overhead"] + ([] if out is None else ["--out", out]))
    assert "give --out another path" in capsys.readouterr().err


def test_only_names_the_kinds_it_allows(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_radial.parse_args(["--only", "prefil", "--out", str(tmp_path / "x.json")])
    assert "choose from 'overhead', 'prefill', 'prefill_fitted', 'decode'" in capsys.readouterr().err
