r"""Peak memory of MetaQuant training steps, whole vs chunked meta network.

What is measured:
    For each (model, method, meta_chunk_size), a fresh child process builds
    the model, quantizes every Dense/conv kernel (1-bit DoReFa), compiles it
    (SGD(0.1) and `PaperAdam(1e-3)` as meta optimizer) and runs ``--steps``
    training steps on one fixed synthetic batch (shapes, not values, decide
    memory). The child reports:

    * ``peak_rss_gb``: the process's peak resident set size (`ru_maxrss`),
      which includes TensorFlow itself, the model, its optimizer slots and the
      MetaQuant state;
    * ``built_rss_gb``: RSS after compile, before the first step, so that
      ``peak - built`` is what the training steps add;
    * ``state_gb``: the MetaQuant state held in variables (per-kernel
      dL/dW_hat, W_tilde, last update; LSTMFC's (h, c): 2 * N * hidden
      floats);
    * ``step_s``: median wall time of the steps after the first (the first
      MetaQuant step only records state; it also traces the function).

    Methods: ``ste`` (no meta network), ``multifc``, ``lstmfc`` (hidden 100,
    (h, c) carried), ``gain_mlp`` (hidden 32). Models: ``resnet20`` (CIFAR, 0.27M weights) and
    ``resnet18`` (CIFAR form, 11.2M weights), from examples/zoo.py.

    A configuration whose memory, predicted from the measured ResNet20
    figures, exceeds ``--max_predicted_gb`` is not run (it would be killed by
    the OOM killer and could take the machine with it); the table says so.

Example:
    PYTHONPATH=. python examples/benchmark_memory.py
    PYTHONPATH=. python examples/benchmark_memory.py --models=resnet20 \
        --chunk_sizes=none,65536 --output_json=/tmp/memory.json
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["resnet20", "resnet18"], "resnet20, resnet18.")
flags.DEFINE_list("methods", ["ste", "multifc", "lstmfc", "gain_mlp"],
                  "ste, multifc, lstmfc, gain_mlp.")
flags.DEFINE_list("chunk_sizes", ["none", "131072"],
                  "meta_chunk_size values ('none': whole).")
flags.DEFINE_integer("batch_size", 8, "Images per step.")
flags.DEFINE_integer("steps", 3, "Training steps per configuration (>= 2).")
flags.DEFINE_float("max_predicted_gb", 20.0,
                   "Skip configurations predicted to need more than this.")
flags.DEFINE_string("output_json", None, "Write the results here as JSON.")
flags.DEFINE_bool("smoke", False,
                  "Tiny run for the tests: resnet20 LSTMFC whole and chunked, 2 steps.")
flags.DEFINE_string("child", None, "Internal: run one 'model:method:chunk'.")

_GB = 1024 ** 3
# LSTMFC whole: the (N, 4 * hidden) gate pre-activations, the gates and the
# new (h, c), kept by the tape, are about this many floats per weight and
# hidden unit on top of the state (fitted to ResNet20; see README). Chunked:
# about _CHUNK_LSTM_FLOATS per chunk row and hidden unit (ResNet20 and
# ResNet-18 runs: 46 and 54).
_WHOLE_LSTM_FLOATS = 16
_CHUNK_LSTM_FLOATS = 55
# GainMLP (hidden 32), the same way: whole ~6, chunked ~66 (ResNet20 runs).
_WHOLE_GAIN_FLOATS = 7
_CHUNK_GAIN_FLOATS = 70


def _rss_gb():
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / _GB


def _current_rss_gb():
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / _GB


def run_child(spec):
    """Runs one configuration in this process; prints one JSON line."""
    import numpy as np
    import keras
    import mq_keras as mqk

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import zoo

    model_name, method, chunk = spec.split(":")
    chunk = None if chunk == "none" else int(chunk)
    keras.utils.set_random_seed(0)
    model = getattr(zoo, model_name)()
    ste = method == "ste"
    q = mqk.quantize_model(
        model, meta_network=None if ste else method,
        estimator="ste" if ste else "metaquant", meta_chunk_size=chunk,
        verbose=False,
    )
    q.compile(optimizer=keras.optimizers.SGD(0.1),
              meta_optimizer=None if ste else mqk.PaperAdam(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(FLAGS.batch_size, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=FLAGS.batch_size)
    built = _current_rss_gb()
    times = []
    for _ in range(FLAGS.steps):
        start = time.perf_counter()
        logs = q.train_on_batch(x, y, return_dict=True)
        times.append(time.perf_counter() - start)
    weights = sum(int(np.prod(s.variable.shape)) for _, s in q._slots)
    state = sum(int(np.prod(v.shape)) * 4 for w in q.wrappers
                for v in w.non_trainable_weights) + sum(
        int(np.prod(v.shape)) * 4 for v in q.meta_state)
    print(json.dumps({
        "model": model_name, "method": method, "meta_chunk_size": chunk,
        "weights": weights, "state_gb": state / _GB,
        "recurrent_state_gb": sum(int(np.prod(v.shape)) * 4
                                  for v in q.meta_state) / _GB,
        "built_rss_gb": built, "peak_rss_gb": _rss_gb(),
        "step_s": statistics.median(times[1:]), "first_step_s": times[0],
        "loss": float(logs["loss"]),
        "skipped_steps": int(q.skipped_steps.numpy()),
    }))


def _predicted_gb(model, method, chunk, measured):
    """Rough peak for an unmeasured config, from measured ones (None: unknown)."""
    weights = {"resnet20": 270_896, "resnet18": 11_164_352}[model]
    base = measured.get(("resnet20", "ste", None), {}).get("peak_rss_gb", 1.0)
    # Model, gradients, SGD and the 3 per-kernel state tensors: ~6 floats per
    # weight; the ResNet-18 activations of a small batch are small.
    gb = base + 6 * 4 * weights / _GB
    if method == "lstmfc":
        per_unit = 2 + (_WHOLE_LSTM_FLOATS if chunk is None else 0)
        gb += per_unit * 4 * weights * 100 / _GB
        if chunk is not None:
            gb += _CHUNK_LSTM_FLOATS * 4 * min(chunk, weights) * 100 / _GB
    if method == "gain_mlp":
        rows = weights if chunk is None else min(chunk, weights)
        floats = _WHOLE_GAIN_FLOATS if chunk is None else _CHUNK_GAIN_FLOATS
        gb += floats * 4 * rows * 32 / _GB
    return gb


def _run(spec):
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        [root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    args = [sys.executable, os.path.abspath(__file__), f"--child={spec}",
            f"--batch_size={FLAGS.batch_size}", f"--steps={FLAGS.steps}"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-800:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    if FLAGS.child:
        run_child(FLAGS.child)
        return
    if FLAGS.smoke:
        FLAGS.models, FLAGS.methods = ["resnet20"], ["lstmfc"]
        FLAGS.chunk_sizes, FLAGS.steps, FLAGS.batch_size = ["none", "16384"], 2, 2
    if FLAGS.steps < 2:
        raise app.UsageError("--steps must be >= 2 (the first step only records).")
    chunks = [None if c == "none" else int(c) for c in FLAGS.chunk_sizes]
    measured, rows = {}, []
    for model in FLAGS.models:
        for method in FLAGS.methods:
            for chunk in (chunks if method != "ste" else [None]):
                key = (model, method, chunk)
                predicted = _predicted_gb(model, method, chunk, measured)
                if predicted > FLAGS.max_predicted_gb:
                    result = {"skipped": f"predicted {predicted:.0f} GB > "
                                         f"--max_predicted_gb={FLAGS.max_predicted_gb:g}"}
                else:
                    result = _run(f"{model}:{method}:{'none' if chunk is None else chunk}")
                result.update(model=model, method=method, meta_chunk_size=chunk,
                              predicted_gb=predicted)
                measured[key] = result
                rows.append(result)
                print(_format(result), flush=True)
    print(f"batch {FLAGS.batch_size}, {FLAGS.steps} steps, 1-bit DoReFa, "
          f"synthetic data; GB = 2^30 bytes")
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump({"config": {"batch_size": FLAGS.batch_size,
                                  "steps": FLAGS.steps}, "results": rows}, f, indent=1)


def _format(r):
    head = f"{r['model']:9s} {r['method']:8s} chunk={str(r['meta_chunk_size']):7s}"
    if "skipped" in r:
        return f"{head} not run: {r['skipped']}"
    if "error" in r:
        return f"{head} failed: {r['error']}"
    return (f"{head} weights={r['weights']:>9,d} state={r['state_gb']:6.2f} GB "
            f"built={r['built_rss_gb']:6.2f} GB peak={r['peak_rss_gb']:6.2f} GB "
            f"step={r['step_s']:7.2f} s")


if __name__ == "__main__":
    app.run(main)
