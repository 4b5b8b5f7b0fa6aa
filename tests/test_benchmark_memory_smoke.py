"""Smoke test of examples/benchmark_memory.py: whole vs chunked LSTMFC on ResNet20."""

import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "benchmark_memory.py"


def test_benchmark_memory_smoke(tmp_path, run_python):
    out = tmp_path / "memory.json"
    proc = run_python(SCRIPT, "--smoke", f"--output_json={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "peak=" in proc.stdout and "synthetic" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert [r["meta_chunk_size"] for r in results] == [None, 16384]
    whole, chunked = results
    for r in results:
        assert "error" not in r, r
        assert r["weights"] == 270_896  # ResNet20's kernels
        # (h, c) of 100 floats per weight, in float32.
        assert abs(r["recurrent_state_gb"] - 2 * 270_896 * 100 * 4 / 2**30) < 1e-6
        assert r["peak_rss_gb"] >= r["built_rss_gb"] > 0
        assert r["skipped_steps"] == 0
    # Whole LSTMFC keeps ~16 floats per weight and hidden unit on the tape
    # (~1.7 GB here); 16k-row chunks keep a few hundred MB.
    assert (whole["peak_rss_gb"] - whole["built_rss_gb"]
            > 2 * (chunked["peak_rss_gb"] - chunked["built_rss_gb"])), results
