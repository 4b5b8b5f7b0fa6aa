"""examples/estimator_study.py: its sweep grid and the merge of result files."""

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def test_sweep_gives_every_method_the_same_grid():
    import estimator_study

    specs = estimator_study.sweep_specs(["ste", "meta_ewgs"], 2, 3, ["0.01", "0.1"], ["1e-3"],
                                        steps=300, batch_size=64, meta_lr=1e-2)
    assert len(specs) == 2 * 3 * 3
    grids = {}
    for s in specs:
        grids.setdefault(s["method"], set()).add((s["optimizer"], s["lr"], s["seed"]))
        assert (s["bits"], s["quantizer"], s["steps"], s["batch_size"]) == (2, "dorefa", 300, 64)
        assert s.get("meta_lr") == (None if s["method"] == "ste" else 1e-2)
    assert grids["ste"] == grids["meta_ewgs"]


def test_load_merges_and_labels_the_frozen_control(tmp_path):
    import estimator_study

    run = dict(method="meta_ewgs", bits=1, optimizer="sgdm", lr=0.1, seed=0, steps=300)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps(dict(run, meta_lr=0.01, v=1)) + "\n"
                 + json.dumps(dict(run, meta_lr=0.01, v=2)) + "\n")
    b.write_text(json.dumps(dict(run, meta_lr=0.0)) + "\n")
    runs = sorted(estimator_study.load([a, b]), key=lambda r: r["method"])
    assert [r["method"] for r in runs] == ["meta_ewgs", "meta_ewgs_lr0"]
    assert runs[0]["v"] == 2  # the last record of a configuration wins
