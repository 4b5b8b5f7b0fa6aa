r"""Per-training-step time of float, STE and MetaQuant training on a small CNN.

What is measured:
    The time of one optimizer step (forward, backward, updates; for MetaQuant
    also the meta network's forward and backward, the look-ahead and the
    meta-optimizer update) of the same small CNN (input 28x28x1:
    Conv2D 32 3x3 -> BN -> ReLU -> MaxPool -> Conv2D 64 3x3 -> BN -> ReLU ->
    MaxPool -> Flatten -> Dense 10), trained as

    * ``float``: the float model, SGD(1e-2);
    * ``ste``: `quantize_model(..., estimator="ste")`, SGD(1e-2);
    * ``fc_grad``, ``multifc``, ``lstmfc``, ``gain_mlp``, ``meta_ewgs``:
      `quantize_model(..., meta_network=name)`, SGD(1e-2) and
      `PaperAdam(1e-3)` as the meta optimizer.

    Every model is built from the same float model (same weights). The data is
    one fixed batch of synthetic random images and labels: the cost of a step
    depends on shapes, not on values, and no input pipeline is involved.

How:
    Each method is compiled, its train function traced and warmed up with
    ``--warmup_steps`` steps (MetaQuant's first step takes the cheaper
    "record only" branch, so at least two warm-up steps are used). Then, for
    ``--repeats`` repeats, every method runs ``--steps`` timed steps; methods
    are interleaved round-robin inside a repeat and the starting method is
    rotated from one repeat to the next, so that a burst of load from other
    processes on a shared machine does not land on one method only.

    Each step is timed separately with `time.perf_counter` (wall) and
    `time.process_time` (CPU time of the whole process, all TensorFlow
    threads, so it can exceed wall time). The table reports the median over
    all timed steps of a method and ratios of those medians (to float and to
    STE) from the same run. Medians are used because wall time on shared VMs
    jumps between modes.

    Memory: peak RSS is a per-process figure and all methods share the
    process, so it is reported once. Per method, the table reports instead the
    size of the MetaQuant training state computed from the model's variables:
    meta network parameters, the meta optimizer's slots, the per-kernel state
    (`prev_grad`, `prev_w_tilde`, `prev_update`, `bias_prev_update`) and the
    recurrent (h, c) state of LSTMFC.

Example:
    PYTHONPATH=. python examples/benchmark_step_time.py
    PYTHONPATH=. python examples/benchmark_step_time.py --methods=ste,multifc \
        --steps=50 --output_json=/tmp/step_time.json
"""

import json
import os
import platform
import resource
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

ALL_METHODS = ("float", "ste", "fc_grad", "multifc", "lstmfc", "gain_mlp", "meta_ewgs")
META_METHODS = ("fc_grad", "multifc", "lstmfc", "gain_mlp", "meta_ewgs")

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("steps", 20, "Timed training steps per method per repeat.")
flags.DEFINE_integer("repeats", 5, "Repeats; methods are interleaved across them.")
flags.DEFINE_integer("warmup_steps", 3, "Untimed steps after tracing (>= 2 for MetaQuant).")
flags.DEFINE_list("methods", list(ALL_METHODS),
                  f"Comma-separated methods, from {', '.join(ALL_METHODS)}.")
flags.DEFINE_string("quantizer", "dorefa", "Kernel quantizer (dorefa, bwn, ternary, uniform).")
flags.DEFINE_integer("num_bits", 1, "Quantizer bit width.")
flags.DEFINE_boolean("jit_compile", False,
                     "Compile train steps with XLA (slower on the CPUs measured so far).")
flags.DEFINE_integer("seed", 0, "Seed of the weights and the synthetic batch.")
flags.DEFINE_string("output_json", None, "Optional path to write the results to as JSON.")
flags.DEFINE_boolean("smoke", False,
                     "Tiny run for tests: batch 8, 2 steps, 1 repeat, 1 warm-up step "
                     "(overrides those flags).")


def build_float_model(seed):
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((28, 28, 1))
    x = layers.Conv2D(32, 3)(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    outputs = layers.Dense(10)(x)
    return keras.Model(inputs, outputs, name="cnn")


def build_method(method, float_model, quantizer, num_bits, jit_compile):
    """Returns a compiled model for `method`, built from `float_model`'s weights."""
    import keras
    import mq_keras

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    sgd = keras.optimizers.SGD(1e-2)
    if method == "float":
        model = keras.models.clone_model(float_model)
        model.set_weights(float_model.get_weights())
        model.compile(optimizer=sgd, loss=loss, jit_compile=jit_compile)
    elif method == "ste":
        model = mq_keras.quantize_model(
            float_model, kernel_quantizer=quantizer, num_bits=num_bits,
            estimator="ste", verbose=False,
        )
        model.compile(optimizer=sgd, loss=loss, jit_compile=jit_compile)
    elif method in META_METHODS:
        model = mq_keras.quantize_model(
            float_model, kernel_quantizer=quantizer, num_bits=num_bits,
            meta_network=method, verbose=False,
        )
        model.compile(optimizer=sgd, meta_optimizer=mq_keras.PaperAdam(1e-3),
                      loss=loss, jit_compile=jit_compile)
    else:
        raise ValueError(f"Unknown method {method!r}; allowed: {ALL_METHODS}.")
    return model


def _numel(variables):
    total = 0
    for v in variables:
        n = 1
        for d in v.shape:
            n *= int(d)
        total += n
    return total


def state_size(model):
    """Float counts of the training state beyond the base model, from variables."""
    from mq_keras import MetaQuantModel

    out = {"base_trainable_params": 0, "meta_params": 0, "meta_optimizer_slots": 0,
           "kernel_state": 0, "recurrent_state": 0}
    if not isinstance(model, MetaQuantModel):
        out["base_trainable_params"] = _numel(model.trainable_variables)
        out["total_state"] = 0
        return out
    out["base_trainable_params"] = _numel(model.base_variables)
    state_vars = []
    for w in model.wrappers:
        if not w.record_state:  # STE wrappers keep no MetaQuant state
            continue
        for s in w.slots:
            state_vars += [s.prev_grad, s.prev_w_tilde, s.prev_update]
        if w.bias_prev_update is not None:
            state_vars.append(w.bias_prev_update)
    out["kernel_state"] = _numel(state_vars)
    if model.meta_network is not None:
        out["meta_params"] = _numel(model.meta_network.weights)
        out["recurrent_state"] = _numel(model.meta_state)
        if model.meta_optimizer is not None:
            # Adam's m and v (the iteration counter and lr are scalars, left out).
            out["meta_optimizer_slots"] = _numel(
                [v for v in model.meta_optimizer.variables if len(v.shape) > 0]
            )
    out["total_state"] = (out["meta_params"] + out["meta_optimizer_slots"]
                          + out["kernel_state"] + out["recurrent_state"])
    return out


def run_benchmark(methods, *, batch_size, steps, repeats, warmup_steps, quantizer,
                  num_bits, jit_compile, seed, log=print):
    """Builds, warms up and times every method; returns a results dict."""
    import numpy as np
    import tensorflow as tf
    import keras

    # Each model owns its train function; TF would warn about "retracing"
    # although nothing is traced twice.
    tf.get_logger().setLevel("ERROR")
    rng = np.random.default_rng(seed)
    # Tensors, not NumPy arrays: no host conversion inside the timed region.
    x = tf.constant(rng.random((batch_size, 28, 28, 1), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, size=(batch_size,)), dtype=tf.int32)
    float_model = build_float_model(seed)

    models, setup = {}, {}
    for method in methods:
        t0 = time.perf_counter()
        model = build_method(method, float_model, quantizer, num_bits, jit_compile)
        # The first call traces and compiles the train function; the next
        # ones settle the optimizers' slots and MetaQuant's first-step branch.
        for _ in range(max(1, warmup_steps)):
            model.train_on_batch(x, y)
        models[method] = model
        setup[method] = time.perf_counter() - t0
        log(f"  {method:<9} built, traced and warmed up in {setup[method]:.1f} s")

    wall = {m: [] for m in methods}
    cpu = {m: [] for m in methods}
    repeat_wall = {m: [] for m in methods}
    for r in range(repeats):
        # Round-robin, starting one method later each repeat.
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        for method in order:
            model = models[method]
            w0 = time.perf_counter()
            for _ in range(steps):
                # train_on_batch rather than fit() + a timing callback: it runs
                # exactly one compiled step on the given tensors and returns
                # its logs as Python floats, which blocks until the step has
                # finished, so the two clock readings bracket one whole step
                # and nothing else (no tf.data iterator, no callback dispatch,
                # no epoch bookkeeping that would land in some batches only).
                # What remains around the step (reset_metrics, a generator,
                # pythonify_logs) is the same for every method.
                c_start, w_start = time.process_time(), time.perf_counter()
                model.train_on_batch(x, y)
                w_end, c_end = time.perf_counter(), time.process_time()
                wall[method].append(w_end - w_start)
                cpu[method].append(c_end - c_start)
            repeat_wall[method].append((time.perf_counter() - w0) / steps)
        log(f"  repeat {r + 1}/{repeats} done")

    results = {}
    for method in methods:
        results[method] = {
            "wall_ms_median": 1e3 * statistics.median(wall[method]),
            "cpu_ms_median": 1e3 * statistics.median(cpu[method]),
            "wall_ms_min": 1e3 * min(wall[method]),
            "wall_ms_per_repeat": [1e3 * t for t in repeat_wall[method]],
            "wall_ms_steps": [1e3 * t for t in wall[method]],
            "cpu_ms_steps": [1e3 * t for t in cpu[method]],
            "setup_s": setup[method],
            "state": state_size(models[method]),
        }
    for ref in ("float", "ste"):
        if ref not in results:
            continue
        for method in methods:
            for kind in ("wall", "cpu"):
                results[method][f"{kind}_ratio_to_{ref}"] = (
                    results[method][f"{kind}_ms_median"]
                    / results[ref][f"{kind}_ms_median"]
                )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "config": {
            "methods": list(methods), "batch_size": batch_size, "steps": steps,
            "repeats": repeats, "warmup_steps": warmup_steps, "quantizer": quantizer,
            "num_bits": num_bits, "jit_compile": jit_compile, "seed": seed,
            "data": "synthetic random batch (step time does not depend on values)",
            "timing": "train_on_batch, per step; median over steps*repeats",
        },
        "environment": {
            "python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        },
        # ru_maxrss is in KiB on Linux, bytes on macOS.
        "peak_rss_mib": peak / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0),
        "results": results,
    }


def format_table(report):
    res = report["results"]
    has_f = any("wall_ratio_to_float" in r for r in res.values())
    has_s = any("wall_ratio_to_ste" in r for r in res.values())

    def ratio(r, key):
        return f"{r[key]:.2f}" if key in r else "-"

    header = (f"{'method':<10}{'wall ms':>9}{'CPU ms':>9}{'min ms':>9}"
              + (f"{'x float':>9}{'CPUx fl':>9}" if has_f else "")
              + (f"{'x STE':>8}{'CPUx STE':>9}" if has_s else "")
              + f"{'meta state floats':>19}{'MiB':>7}")
    lines = [header, "-" * len(header)]
    for method, r in res.items():
        st = r["state"]["total_state"]
        lines.append(
            f"{method:<10}{r['wall_ms_median']:>9.2f}{r['cpu_ms_median']:>9.2f}"
            f"{r['wall_ms_min']:>9.2f}"
            + (f"{ratio(r, 'wall_ratio_to_float'):>9}{ratio(r, 'cpu_ratio_to_float'):>9}"
               if has_f else "")
            + (f"{ratio(r, 'wall_ratio_to_ste'):>8}{ratio(r, 'cpu_ratio_to_ste'):>9}"
               if has_s else "")
            + f"{st:>19,}{4 * st / 2**20:>7.2f}"
        )
    return "\n".join(lines)


def format_state(report):
    lines = [f"{'method':<10}{'meta params':>12}{'Adam slots':>12}{'kernel state':>14}"
             f"{'(h, c)':>12}{'base params':>13}"]
    for method, r in report["results"].items():
        s = r["state"]
        lines.append(f"{method:<10}{s['meta_params']:>12,}{s['meta_optimizer_slots']:>12,}"
                     f"{s['kernel_state']:>14,}{s['recurrent_state']:>12,}"
                     f"{s['base_trainable_params']:>13,}")
    return "\n".join(lines)


def main(argv):
    del argv
    batch_size, steps, repeats, warmup = (
        FLAGS.batch_size, FLAGS.steps, FLAGS.repeats, FLAGS.warmup_steps)
    if FLAGS.smoke:
        batch_size, steps, repeats, warmup = 8, 2, 1, 1
    methods = [m.strip().lower() for m in FLAGS.methods if m.strip()]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown or not methods:
        raise app.UsageError(f"--methods: unknown {unknown}; allowed {ALL_METHODS}.")
    if len(set(methods)) != len(methods):
        raise app.UsageError("--methods lists a method twice.")
    if min(batch_size, steps, repeats) < 1 or warmup < 0:
        raise app.UsageError("--batch_size, --steps, --repeats must be >= 1.")
    if warmup < 2 and not FLAGS.smoke and set(methods) & set(META_METHODS):
        print("note: MetaQuant's first step is a cheaper record-only step; "
              "--warmup_steps >= 2 excludes it from the timings.")

    print(f"Step time: batch {batch_size}, {steps} steps x {repeats} repeats per "
          f"method, warm-up {max(1, warmup)}, quantizer {FLAGS.quantizer} "
          f"{FLAGS.num_bits}-bit, jit_compile={FLAGS.jit_compile}.")
    print("Data: one synthetic random batch; the step time depends on shapes, "
          "not on the data.")
    report = run_benchmark(
        methods, batch_size=batch_size, steps=steps, repeats=repeats,
        warmup_steps=warmup, quantizer=FLAGS.quantizer, num_bits=FLAGS.num_bits,
        jit_compile=FLAGS.jit_compile, seed=FLAGS.seed,
    )
    env = report["environment"]
    print()
    print(f"TF {env['tensorflow']}, Keras {env['keras']}, {env['cpu_count']} CPUs. "
          "Medians over all timed steps; ratios of medians from this run. "
          "CPU time is the whole process (all threads).")
    print(format_table(report))
    print()
    print("MetaQuant training state, floats (STE wrappers keep none):")
    print(format_state(report))
    print(f"Peak RSS of the whole process (all methods): {report['peak_rss_mib']:.0f} MiB")
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"Wrote {FLAGS.output_json}")


if __name__ == "__main__":
    app.run(main)
