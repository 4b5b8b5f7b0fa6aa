r"""MetaEWGS (`meta_network="meta_ewgs"`) against the STE at the STE's own best lr.

Modes, on the MNIST small CNN of `examples/zoo.py`:

* `--mode=timing`: median `train_on_batch` wall time of the STE and of
  MetaEWGS at batch `--batch_size`, in interleaved blocks (STE block,
  MetaEWGS block, ... with the order alternating), so that load from other
  processes on a shared machine lands on both; prints the ratio of medians.
* `--mode=sweep`: every method of `--methods` (default ste,meta_ewgs) at
  DoReFa `--bits`, under SGD with momentum 0.9 at `--sgdm_lrs` and Adam at
  `--adam_lrs`, `--seeds` seeds, the same data, steps and float start for every method (the MNIST
  budget of benchmark.py's quick/strong profiles: 300 steps of 64, from a
  157-step float start). Runs go through `benchmark.run_one` in this
  process, one after the other, and are appended to `--output` (JSON lines;
  a rerun skips the runs already there). Prints every configuration and each
  method's best of sweep (mean of the last 3 checkpoints, mean +- std over
  seeds), the learned per-kernel delta/gamma of MetaEWGS, and the ratio
  `||calib * m|| / ||dL/dV||` (`meta_grad_ratio`) that rules out a hidden
  learning-rate multiplier. `--meta_lr=0` gives the control
  "meta_ewgs_lr0" (delta = gamma = 0: the STE's direction through
  MetaQuant's step).
* `--mode=report --inputs=a.jsonl,b.jsonl`: the same report for merged files.

Example:
    export TFDS_DATA_DIR=../shared/tensorflow_datasets
    PYTHONPATH=. python examples/estimator_study.py --mode=timing
    PYTHONPATH=. python examples/estimator_study.py --mode=sweep --bits=1 \
        --output=/tmp/mq_est/bits1.jsonl
    PYTHONPATH=. python examples/estimator_study.py --mode=report \
        --inputs=/tmp/mq_est/bits1.jsonl,/tmp/mq_est_frozen/bits1.jsonl
"""

import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

# benchmark.py's flags --methods (default here: ste,meta_ewgs) and --seeds
# are this script's too.
import benchmark  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "sweep", ["sweep", "timing", "report"],
                  "What to measure (report: only print the runs of --inputs).")
flags.DEFINE_list("inputs", [], "Report mode: JSON-lines files to merge.")
# --bits (the DoReFa width, one value; default 1) is benchmark.py's flag.
flags.DEFINE_list("sgdm_lrs", ["0.01", "0.03", "0.1"], "SGD (momentum 0.9) rates.")
flags.DEFINE_list("adam_lrs", ["1e-3", "3e-3"], "Adam rates.")
flags.DEFINE_float("meta_lr", 1e-2, "Meta optimizer (PaperAdam) rate of MetaEWGS.")
flags.DEFINE_integer("steps", 300, "Training steps per run.", lower_bound=1)
flags.DEFINE_string("output", None, "JSON-lines results file (default: a temp file).")
flags.DEFINE_integer("batch_size", 64, "Batch size.", lower_bound=1)
flags.DEFINE_integer("blocks", 10, "Timing: blocks per method.", lower_bound=1)
flags.DEFINE_integer("block_steps", 20, "Timing: steps per block.", lower_bound=1)

# MNIST budget of benchmark.py's quick and strong profiles.
MNIST_BUDGET = dict(eval_every=50, train_limit=10000, test_limit=5000, last_k=3,
                    pretrain_steps=157)


def sweep_specs(methods, bits, seeds, sgdm_lrs, adam_lrs, *, steps, batch_size, meta_lr):
    """The run specs of one sweep (`benchmark._run` dicts)."""
    grid = [("sgdm", lr) for lr in sgdm_lrs] + [("adam", lr) for lr in adam_lrs]
    specs = []
    for seed in range(seeds):
        for method in methods:
            for opt, lr in grid:
                spec = benchmark._run("mnist", method, quantizer="dorefa", bits=bits,
                                      optimizer=opt, lr=float(lr), seed=seed, steps=steps,
                                      batch_size=batch_size, **MNIST_BUDGET)
                if method not in ("ste", "float"):
                    spec["meta_lr"] = meta_lr
                specs.append(spec)
    return specs


def load(paths):
    """Runs of JSON-lines files, one per configuration (the last one wins).

    MetaEWGS runs with `meta_lr == 0` are relabelled "meta_ewgs_lr0": its
    parameters stay at 0, so it is the STE's direction through MetaQuant's
    step (the control that separates the learned delta/gamma from the step).
    """
    done = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                done[_key(r)] = r
    for r in done.values():
        if r["method"] == "meta_ewgs" and r.get("meta_lr") == 0:
            r["method"] = "meta_ewgs_lr0"
    return list(done.values())


def _key(spec):
    return json.dumps({k: spec[k] for k in sorted(spec)
                       if k in ("method", "bits", "optimizer", "lr", "seed", "steps",
                                "meta_lr")})


def run_sweep(specs, output, cache_dir):
    """Runs the specs not yet in `output`; returns every result there."""
    done = {_key(r): r for r in load([output] if os.path.exists(output) else [])}
    for i, spec in enumerate(specs):
        if _key(spec) in done:
            continue
        t0 = time.time()
        r = benchmark.run_one(spec, cache_dir)
        done[_key(spec)] = r
        with open(output, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"[{i + 1}/{len(specs)}] {spec['method']} {spec['optimizer']} {spec['lr']:g} "
              f"seed {spec['seed']}: last {100 * r['accuracy'][-1]:.2f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    return [done[_key(s)] for s in specs]


def report(results):
    """Prints every configuration, the best of sweep and MetaEWGS' parameters."""
    import numpy as np
    import sweep

    rows = benchmark.summarize(results)
    print(f"\n{'method':<14}{'opt':<6}{'lr':>7}{'mean last +- std':>19}  per seed")
    for r in rows:
        print(f"{r['method']:<14}{r['optimizer']:<6}{r['lr']:>7g}{r['mean_last']:>11.2f} "
              f"+- {r['std_seeds']:4.2f}  {r['per_seed']}")
    sweep.print_best(rows)
    best = {(r["method"]): r for r in sweep.best_of_sweep(rows)}
    ours = best.get("meta_ewgs")
    if ours is None:
        return
    runs = [r for r in results if r["method"] == "meta_ewgs"
            and (r["optimizer"], r["lr"]) == (ours["optimizer"], ours["lr"])]
    print(f"\nMetaEWGS at its best ({ours['optimizer']} {ours['lr']:g}): learned "
          "delta / gamma per kernel, per seed")
    for r in sorted(runs, key=lambda r: r["seed"]):
        p = r["meta_parameters"]
        cells = [f"{k}: d={d:+.3f} g={g:+.3f}"
                 for k, d, g in zip(p["kernels"], p["delta"], p["gamma"])]
        print(f"  seed {r['seed']}: " + "; ".join(cells))
    learned = [r for r in results if r["method"] == "meta_ewgs"]
    print(f"Over all {len(learned)} MetaEWGS runs (every lr and seed), mean +- std:")
    for i, kernel in enumerate(learned[0]["meta_parameters"]["kernels"]):
        d = [r["meta_parameters"]["delta"][i] for r in learned]
        g = [r["meta_parameters"]["gamma"][i] for r in learned]
        print(f"  {kernel}: delta {np.mean(d):+.3f} +- {np.std(d):.3f}, "
              f"gamma {np.mean(g):+.3f} +- {np.std(g):.3f}")
    ratios = [v for r in results if r["method"] == "meta_ewgs"
              for v in r.get("meta_grad_ratio", [])]
    if ratios:
        print(f"meta_grad_ratio ||calib*m|| / ||dL/dV|| per checkpoint, all MetaEWGS runs: "
              f"median {np.median(ratios):.3f}, range {min(ratios):.3f}..{max(ratios):.3f}")


def timing(batch_size, blocks, block_steps):
    """Median train_on_batch seconds of STE and MetaEWGS; interleaved blocks."""
    import keras
    import numpy as np
    import mq_keras
    import zoo

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((batch_size, 28, 28, 1), dtype="float32")
    y = rng.integers(0, 10, batch_size)
    float_model = zoo.small_cnn()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    models = {}
    for method in ("ste", "meta_ewgs"):
        net = mq_keras.quantize_model(float_model, meta_network=method, verbose=False)
        net.compile(optimizer=keras.optimizers.SGD(0.03, momentum=0.9), loss=loss,
                    meta_optimizer=None if method == "ste" else mq_keras.PaperAdam(1e-2))
        for _ in range(3):  # trace; MetaQuant's first step only records
            net.train_on_batch(x, y)
        models[method] = net
    times = {m: [] for m in models}
    order = list(models)
    for b in range(blocks):
        for method in (order if b % 2 == 0 else order[::-1]):
            for _ in range(block_steps):
                t0 = time.perf_counter()
                models[method].train_on_batch(x, y)
                times[method].append(time.perf_counter() - t0)
    med = {m: statistics.median(t) for m, t in times.items()}
    return med, med["meta_ewgs"] / med["ste"]


def main(argv):
    del argv
    if FLAGS.mode == "report":
        report(load(FLAGS.inputs))
        return
    if FLAGS.mode == "timing":
        med, ratio = timing(FLAGS.batch_size, FLAGS.blocks, FLAGS.block_steps)
        for m, t in med.items():
            print(f"{m:<10} median train_on_batch {1000 * t:.2f} ms")
        print(f"MetaEWGS / STE: {ratio:.3f}x (batch {FLAGS.batch_size}, "
              f"{FLAGS.blocks} interleaved blocks of {FLAGS.block_steps} steps each)")
        return
    output = FLAGS.output or os.path.join(tempfile.mkdtemp(prefix="mq_est_"), "runs.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if FLAGS.bits and len(FLAGS.bits) != 1:
        raise app.UsageError(f"--bits takes one width here, got {FLAGS.bits}.")
    bits = int(FLAGS.bits[0]) if FLAGS.bits else 1
    specs = sweep_specs(FLAGS.methods or ["ste", "meta_ewgs"], bits, FLAGS.seeds,
                        FLAGS.sgdm_lrs,
                        FLAGS.adam_lrs, steps=FLAGS.steps, batch_size=FLAGS.batch_size,
                        meta_lr=FLAGS.meta_lr)
    print(f"{len(specs)} runs -> {output}", flush=True)
    report(run_sweep(specs, output, os.path.dirname(os.path.abspath(output))))


if __name__ == "__main__":
    app.run(main)
