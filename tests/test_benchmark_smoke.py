"""Smoke test of examples/benchmark_step_time.py: runs it tiny, end to end."""

import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "benchmark_step_time.py"
METHODS = ("float", "ste", "fc_grad", "multifc", "lstmfc", "gain_mlp", "meta_ewgs")


def test_benchmark_step_time_smoke(tmp_path, run_python):
    out = tmp_path / "step_time.json"
    proc = run_python(SCRIPT, "--smoke", f"--output_json={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("method"):]
    for method in METHODS:
        assert f"\n{method} " in table, (method, proc.stdout)
    assert "synthetic" in proc.stdout

    report = json.loads(out.read_text())
    assert report["config"]["batch_size"] == 8
    assert report["config"]["steps"] == 2
    results = report["results"]
    assert list(results) == list(METHODS)
    for method in METHODS:
        r = results[method]
        assert r["wall_ms_median"] > 0 and r["cpu_ms_median"] > 0, (method, r)
        assert len(r["wall_ms_steps"]) == 2
        assert all(t > 0 for t in r["wall_ms_steps"])
        assert r["wall_ratio_to_float"] > 0 and r["wall_ratio_to_ste"] > 0
    assert results["float"]["state"]["total_state"] == 0
    for method in ("fc_grad", "multifc", "lstmfc", "gain_mlp", "meta_ewgs"):
        state = results[method]["state"]
        assert state["meta_params"] > 0 and state["kernel_state"] > 0
        assert state["total_state"] > results["ste"]["state"]["total_state"]
    assert results["lstmfc"]["state"]["recurrent_state"] > 0
