"""``experiments/grouped_matmul.py``: its three forms compute the same rows, and it refuses forms that do not."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import grouped_matmul  # noqa: E402

LOADS, SIZES = (3, 0, 7, 1), (0, 2, 4, 8)


def plain_rows(forms, loads):
    """Each layer's loaded rows times its weight, by NumPy, in layer order."""
    x_lce, w_lef, _ = (np.asarray(a) for a in forms["switch"][1])
    return np.concatenate([x_lce[l, :n] @ w_lef[l] for l, n in enumerate(loads)])


def test_ragged_form_equals_each_layers_rows_times_its_weight():
    forms = grouped_matmul.programs(LOADS, SIZES, e=8, f=16)
    fn, args = forms["ragged"]
    np.testing.assert_allclose(np.asarray(fn(*args)), plain_rows(forms, LOADS), rtol=1e-5, atol=1e-5)


def test_switch_and_padded_forms_hold_the_same_rows():
    forms = grouped_matmul.programs(LOADS, SIZES, e=8, f=16)
    want = plain_rows(forms, LOADS)
    for name in ("switch", "padded"):
        fn, args = forms[name]
        out = np.asarray(fn(*args))  # [L, C, f]
        got = np.concatenate([out[l, :n] for l, n in enumerate(LOADS)])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
        if name == "switch":
            assert np.all(out[1] == 0)  # a layer nobody visits runs nothing (the padded batch runs it)


def test_forms_that_disagree_are_refused():
    forms = grouped_matmul.programs(LOADS, SIZES, e=8, f=16)
    fn, args = forms["ragged"]
    forms["ragged"] = (lambda *a: fn(*a) * 1.01, args)
    with pytest.raises(SystemExit, match="the forms disagree"):
        grouped_matmul.check_same_values(forms, LOADS)


def test_a_run_writes_its_figures_from_the_loads_of_a_bench_radial_result(tmp_path):
    source = tmp_path / "bench.json"
    source.write_text(json.dumps({"settings": {"batch": 2}, "details": {"prefill_fitted": [
        {"target_depth": 0.25, "c_max": 4, "prefill_buckets": 2, "layer_sizes": [[1, 2, 0], [3, 4, 1]]}]}}))
    out = tmp_path / "grouped.json"
    grouped_matmul.main(["--loads-from", str(source), "--hidden", "8", "--ffn", "16", "--repeats", "1",
                         "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["details"]["loads"] == [3, 4, 1]  # the step with the most tokens
    assert [f["key"] for f in result["figures"]] == ["ragged_xla_flops", "ragged_vs_switch", "padded_vs_switch"]
    assert result["details"]["flops"]["ideal"] == 2 * 8 * 8 * 16


def test_a_depth_the_result_lacks_is_named_with_those_it_has(tmp_path):
    source = tmp_path / "bench.json"
    source.write_text(json.dumps({"settings": {"batch": 2}, "details": {"prefill_fitted": [
        {"target_depth": 0.5, "c_max": 4, "prefill_buckets": 2, "layer_sizes": [[1, 2, 0]]}]}}))
    with pytest.raises(SystemExit, match=r"no fitted prefill at target depth 0.25; it has \[0.5\]"):
        grouped_matmul.main(["--loads-from", str(source), "--out", str(tmp_path / "x.json")])


@pytest.mark.parametrize("flag", ["--hidden", "--ffn", "--repeats"])
def test_sizes_below_one_are_refused_before_any_work(flag, tmp_path, capsys):
    with pytest.raises(SystemExit):
        grouped_matmul.main([flag, "0", "--out", str(tmp_path / "x.json")])
    assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err
