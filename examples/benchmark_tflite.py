r"""Size, single-thread latency and fidelity of the three TFLite exports.

What is measured:
    A CNN (``--model``; by default the main job's small CNN, examples/mnist.py
    `make_model`: input 28x28x1, Conv2D 32 3x3 -> BN -> ReLU -> MaxPool ->
    Conv2D 64 3x3 -> BN -> ReLU -> MaxPool -> Flatten -> Dense 10 -> BN; BN
    momentum 0.9) is quantized with `mq_keras.quantize_model`
    (``--quantizer``, ``--num_bits``; every conv/dense kernel) and converted
    by `mq_keras.convert_to_tflite` into four files:

    * ``float``: float32 kernels holding the quantized values Q(W);
    * ``weights``: the default export: the kernels stored as int8 codes with
      per-channel scales, expanded by builtin DEQUANTIZE ops; float
      arithmetic;
    * ``weights_int4``: the same with ``weight_dtype="int4"`` (int4 codes
      where they fit: smaller, slower convolutions);
    * ``int8``: the converter's full-integer model, calibrated on 256
      training images.

    ``--model=resnet20`` (examples/zoo.py, the CIFAR ResNet20) and
    ``--model=mobilenetv2`` (`keras.applications.MobileNetV2`, 32x32x3,
    ``weights=None``, 10 classes, logits out) take 32x32x3 inputs: they run on random
    images and untrained weights (no CIFAR-10 is read), which leaves sizes
    and latencies as they are but makes the agreement figures those of an
    untrained model on noise.

    For each file the table gives its size in bytes and its ratio to the
    float file; its inference latency in the LiteRT interpreter with ONE
    thread at batch ``--batch_size`` (median and 90th percentile of the
    timed invocations, in microseconds, and the ratio of each to the float
    file's in the same interpreter); and, on ``--eval_samples`` test images,
    its top-1 agreement with the Keras model and the largest absolute logit
    difference (`mq_keras.verify_tflite`), with both accuracies when labels
    are known.

How:
    Before timing, the model is optionally trained briefly so that the
    agreement figures are those of a working classifier (latency does not
    depend on the weights): ``--train_steps`` steps of float training (Adam
    1e-3), then ``--train_steps`` steps of quantization-aware training (plain
    SGD 0.05 and, for MetaQuant, a MultiFC meta network with PaperAdam 1e-3,
    as in examples/mnist.py). ``--train_steps=0`` keeps the initial weights.

    Every (file, interpreter) pair gets its own interpreter
    (``num_threads=1``), resized to the batch size and fed one fixed input
    batch. The ``--runs`` timed rounds are split into ``--blocks`` blocks;
    each block creates fresh interpreters, the creation order rotated by one
    pair per block (the interpreter created first was measured up to 10%
    faster than an identical one created later, on a model whose weights
    exceed the caches), runs ``--warmup`` untimed invocations of each, then
    its rounds: a round invokes every pair once, round-robin, starting one
    pair later each round, so that load from other processes on a shared
    machine is spread over all files instead of landing on one. Each block
    gives a median ratio to the float file; the table shows the median over
    all runs and the lowest and highest block ratio (the spread). Only
    `Interpreter.invoke()` is inside the clock readings
    (`time.perf_counter`, wall; `time.process_time`, CPU of the whole
    process, also reported). Medians are used because wall time on shared
    machines jumps between modes.

    Interpreters (``--interpreter``): ``auto`` is whatever
    `mq_keras.export.make_interpreter` picks (ai-edge-litert's
    `ai_edge_litert.interpreter.Interpreter` when that package is installed,
    else `tf.lite.Interpreter`); ``tflite`` and ``litert`` force one;
    ``both`` times and verifies every file with both, interleaved in the
    same rounds. The agreement figures use the selected interpreter too:
    `verify_tflite` runs the file through `mq_keras.export.make_interpreter`,
    which this script replaces for the duration of the call (and checks that
    the replacement was used).

Data:
    MNIST through tensorflow-datasets when a prepared copy is found
    (``TFDS_DATA_DIR``, else ``../shared/tensorflow_datasets`` beside the
    repository), as in examples/mnist.py; only the slices needed are read.
    Without it (or with ``--data=random``) the inputs are uniform random
    images, nothing is trained, and the output says so: the latencies and
    sizes are unaffected, the agreement figures are then those of an
    untrained model on noise.

Example:
    PYTHONPATH=. python examples/benchmark_tflite.py
    PYTHONPATH=. python examples/benchmark_tflite.py --model=resnet20
    PYTHONPATH=. python examples/benchmark_tflite.py --interpreter=both \
        --runs=500 --output_json=/tmp/tflite_bench.json
    PYTHONPATH=. python examples/benchmark_tflite.py --smoke
"""

import contextlib
import glob
import json
import os
import pathlib
import platform
import statistics
import time
import warnings

_REPO = pathlib.Path(__file__).resolve().parents[1]
_SHARED_TFDS = _REPO.parent / "shared" / "tensorflow_datasets"
# Must happen before tensorflow_datasets is imported.
if "TFDS_DATA_DIR" not in os.environ and _SHARED_TFDS.is_dir():
    os.environ["TFDS_DATA_DIR"] = str(_SHARED_TFDS)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

# File -> convert_to_tflite arguments; float first: the reference of the ratios.
FILES = {
    "float": {"mode": "float"},
    "weights": {},  # the default export (weights mode, int8 codes)
    "weights_int4": {"weight_dtype": "int4"},
    "int8": {"mode": "int8"},
}
MODES = tuple(FILES)
MODELS = ("cnn", "resnet20", "mobilenetv2")
INTERPRETERS = ("auto", "tflite", "litert", "both")
MIN_RUNS = 50
REPRESENTATIVE_IMAGES = 256

FLAGS = flags.FLAGS
flags.DEFINE_enum("quantizer", "dorefa", ["dorefa", "bwn", "ternary", "uniform"],
                  "Kernel quantizer.")
flags.DEFINE_integer("num_bits", 1, "Kernel bit width.")
flags.DEFINE_enum("model", "cnn", list(MODELS),
                  "cnn: the main job's MNIST CNN (trained briefly on MNIST when "
                  "found); resnet20: examples/zoo.py's CIFAR ResNet20; "
                  "mobilenetv2: keras.applications.MobileNetV2 at 32x32x3, "
                  "weights=None (both: random images, untrained).")
flags.DEFINE_enum("estimator", "metaquant", ["metaquant", "ste"],
                  "Estimator of the brief quantization-aware training.")
flags.DEFINE_integer("train_steps", 200,
                     "Float steps, then as many quantization-aware steps, before "
                     "export (0: untrained weights).")
flags.DEFINE_integer("train_batch_size", 128, "Batch size of the training.")
flags.DEFINE_integer("batch_size", 1, "Batch size of the timed invocations.")
flags.DEFINE_integer("runs", 100,
                     f"Timed invocations per file (at least {MIN_RUNS}; round-robin "
                     "across the files).")
flags.DEFINE_integer("warmup", 10, "Untimed invocations per file before timing "
                     "(in every block).")
flags.DEFINE_integer("blocks", 5,
                     "Blocks the timed runs are split into; each creates fresh "
                     "interpreters in a rotated order (1 <= blocks <= runs).")
flags.DEFINE_integer("eval_samples", 2000,
                     "Test images for top-1 agreement and max |logit difference|.")
flags.DEFINE_enum("interpreter", "auto", list(INTERPRETERS),
                  "auto: what mq_keras.export.make_interpreter picks (LiteRT when "
                  "ai-edge-litert is installed, else tf.lite); tflite: "
                  "tf.lite.Interpreter; litert: ai_edge_litert's Interpreter; "
                  "both: tflite and litert, interleaved.")
flags.DEFINE_enum("data", "auto", ["auto", "mnist", "random"],
                  "auto: prepared tfds MNIST if found, else random images; mnist: "
                  "prepared MNIST (error if absent); random: uniform random images.")
flags.DEFINE_integer("seed", 0, "Seed of the weights, the training order and "
                     "random data.")
flags.DEFINE_string("output_json", None, "Optional path to write the results to as JSON.")
flags.DEFINE_boolean("smoke", False,
                     "Tiny run for tests: no training, 5 timed runs in 1 block, "
                     "1 warm-up, 20 eval samples (overrides those flags).")


# ----------------------------------------------------------------------------- data

def prepared_mnist_dir():
    """Returns the tfds data dir holding a prepared MNIST, or None."""
    data_dir = os.environ.get("TFDS_DATA_DIR")
    if data_dir and glob.glob(os.path.join(data_dir, "mnist", "*",
                                           "dataset_info.json")):
        return data_dir
    return None


def load_data(source, *, train_n, eval_n, seed, shape=(28, 28, 1)):
    """Returns `(x_train, y_train, x_test, y_test, description)`.

    Images are float32 in [0, 1], shape (n,) + `shape`; labels are int64, or
    None for random data. Only `train[:train_n]` and `test[:eval_n]` are read
    (MNIST only for the default 28x28x1 shape).
    """
    import numpy as np

    data_dir = (prepared_mnist_dir()
                if source != "random" and tuple(shape) == (28, 28, 1) else None)
    if source == "mnist" and data_dir is None:
        raise app.UsageError(
            "--data=mnist: no prepared MNIST under TFDS_DATA_DIR or "
            f"{_SHARED_TFDS}.")
    if data_dir is not None:
        import tensorflow_datasets as tfds

        (x_tr, y_tr), (x_te, y_te) = tfds.as_numpy(tfds.load(
            "mnist", split=[f"train[:{train_n}]", f"test[:{eval_n}]"],
            as_supervised=True, batch_size=-1, data_dir=data_dir, download=False,
        ))
        return (x_tr.astype("float32") / 255.0, y_tr.astype("int64"),
                x_te.astype("float32") / 255.0, y_te.astype("int64"),
                f"MNIST (tfds, {data_dir})")
    rng = np.random.default_rng(seed)
    return (rng.random((train_n,) + tuple(shape), dtype=np.float32), None,
            rng.random((eval_n,) + tuple(shape), dtype=np.float32), None,
            "RANDOM uniform images (no prepared MNIST used)")


# ---------------------------------------------------------------------------- model

def make_model(name="cnn"):
    """The CNN `--model` names (see MODELS); "cnn" is the main job's.

    "cnn" is examples/mnist.py `make_model` through `zoo.small_cnn`, its
    flag-free copy (tests/test_zoo.py checks it layer by layer against
    mnist.py); importing mnist.py itself would define its absl flags, several
    of which share names with these.
    """
    import zoo

    if name == "cnn":
        return zoo.small_cnn()
    if name == "resnet20":
        return zoo.resnet20()
    if name == "mobilenetv2":
        import keras

        # Logits, as the other models give: an untrained quantized net's
        # softmax saturates to ties, which makes top-1 agreement meaningless.
        return keras.applications.MobileNetV2(
            input_shape=(32, 32, 3), weights=None, classes=10,
            classifier_activation=None)
    raise ValueError(f"Unknown model {name!r}; choose from {MODELS}.")


def architecture(model):
    """`[[class name, output shape], ...]` of a model's layers, for the JSON."""
    return [[type(l).__name__, list(l.output.shape[1:])] for l in model.layers]


def build_quantized(*, quantizer, num_bits, estimator, train_steps,
                    train_batch_size, x_train, y_train, seed, log=print,
                    model="cnn"):
    """Builds the CNN, trains it briefly if asked, returns (float, quantized)."""
    import keras
    import tensorflow as tf

    import mq_keras

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def batches():
        ds = tf.data.Dataset.from_tensor_slices((x_train, y_train))
        ds = ds.shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True)
        return ds.repeat().batch(train_batch_size)

    keras.utils.set_random_seed(seed)
    float_model = make_model(model)
    if train_steps:
        float_model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
        t0 = time.perf_counter()
        float_model.fit(batches(), steps_per_epoch=train_steps, epochs=1,
                        shuffle=False, verbose=0)  # the dataset shuffles
        log(f"  float training: {train_steps} steps in "
            f"{time.perf_counter() - t0:.1f} s")
    qmodel = mq_keras.quantize_model(
        float_model, kernel_quantizer=quantizer, num_bits=num_bits,
        estimator=estimator, verbose=False,
    )
    if train_steps:
        qmodel.compile(
            optimizer=keras.optimizers.SGD(0.05),
            meta_optimizer=(mq_keras.PaperAdam(1e-3)
                            if estimator == "metaquant" else None),
            loss=loss,
        )
        keras.utils.set_random_seed(seed + 1)
        t0 = time.perf_counter()
        qmodel.fit(batches(), steps_per_epoch=train_steps, epochs=1,
                   shuffle=False, verbose=0)
        log(f"  {estimator} training: {train_steps} steps in "
            f"{time.perf_counter() - t0:.1f} s")
    return float_model, qmodel


# ---------------------------------------------------------------------- interpreters

def litert_version():
    """The installed ai-edge-litert version, or None."""
    try:
        from importlib import metadata

        return metadata.version("ai-edge-litert")
    except Exception:  # noqa: BLE001 - not installed (or no metadata)
        return None


def _tflite_factory(tflite_bytes, *, num_threads=1):
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation
        return tf.lite.Interpreter(model_content=tflite_bytes,
                                   num_threads=num_threads)


def _litert_factory(tflite_bytes, *, num_threads=1):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=tflite_bytes, num_threads=num_threads)


def _kind(interp):
    """"litert" or "tflite", from the class of an interpreter instance."""
    module = type(interp).__module__
    if module.startswith("ai_edge_litert"):
        return "litert"
    if module.startswith("tensorflow"):
        return "tflite"
    return module


def interpreter_factories(choice):
    """Returns `{name: factory(bytes, num_threads=...)}` for `--interpreter`."""
    from mq_keras import export

    if choice in ("litert", "both"):
        try:
            import ai_edge_litert.interpreter  # noqa: F401
        except ImportError as e:
            raise app.UsageError(
                f"--interpreter={choice} needs the ai-edge-litert package "
                f"(pip install ai-edge-litert): {e}") from e
    if choice == "auto":
        make = export.make_interpreter
        return {"auto": lambda b, num_threads=1: make(b, num_threads=num_threads)}
    if choice == "both":
        return {"tflite": _tflite_factory, "litert": _litert_factory}
    return {choice: _tflite_factory if choice == "tflite" else _litert_factory}


@contextlib.contextmanager
def _verify_with(factory):
    """Makes `mq_keras.verify_tflite` build its interpreters with `factory`.

    `verify_tflite` -> `run_tflite` -> `mq_keras.export.make_interpreter`
    (looked up at call time); the library is not changed, the module
    attribute is swapped for the call and restored. Yields the list of the
    interpreters built, so the caller can check the swap took effect.
    """
    from mq_keras import export

    built = []
    saved = export.make_interpreter

    def make(tflite_bytes, *, num_threads=1):
        interp = factory(tflite_bytes, num_threads=num_threads)
        built.append(interp)
        return interp

    export.make_interpreter = make
    try:
        yield built
    finally:
        export.make_interpreter = saved


def const_tensor_types(tflite_bytes):
    """`{tensor type: count}` of the constant tensors (those with data) of a file."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    names = {v: k for k, v in vars(schema.TensorType).items()
             if not k.startswith("_")}
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(tflite_bytes))
    counts = {}
    for sg in model.subgraphs:
        for t in sg.tensors:
            buf = model.buffers[t.buffer]
            if buf.data is not None and len(buf.data):
                name = names.get(t.type, str(t.type))
                counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------------------- timing

def time_invocations(blobs, factories, x, *, runs, warmup, num_threads=1,
                     blocks=1):
    """Times `invoke()` of every (mode, interpreter) pair, round-robin.

    Args:
        blobs: `{mode: tflite bytes}`.
        factories: `{interpreter name: factory}`.
        x: the one input batch every invocation gets.
        runs: timed rounds in all; each invokes every pair once.
        warmup: untimed rounds at the start of every block.
        num_threads: interpreter threads.
        blocks: the rounds are split into this many blocks; each block
            creates fresh interpreters, the creation order rotated by one
            pair per block.

    Returns:
        `{(mode, name): {"wall_us": [...], "cpu_us": [...], "kind": ...,
        "block_median_us": [...]}}`.
    """
    import numpy as np

    pairs = [(mode, name) for mode in blobs for name in factories]
    wall = {p: [] for p in pairs}
    cpu = {p: [] for p in pairs}
    block_median = {p: [] for p in pairs}
    kinds = {}
    perf, proc = time.perf_counter, time.process_time
    for b in range(blocks):
        rounds = runs // blocks + (1 if b < runs % blocks else 0)
        k = b % len(pairs)
        order = pairs[k:] + pairs[:k]
        interps = {}
        for pair in order:
            interp = factories[pair[1]](blobs[pair[0]], num_threads=num_threads)
            inp = interp.get_input_details()[0]
            interp.resize_tensor_input(inp["index"], x.shape)
            interp.allocate_tensors()
            interp.set_tensor(inp["index"], np.asarray(x, inp["dtype"]))
            interps[pair] = interp
            kinds[pair] = _kind(interp)
        for _ in range(warmup):
            for pair in order:
                interps[pair].invoke()
        block = {p: [] for p in pairs}
        for r in range(rounds):
            k = r % len(order)
            for pair in order[k:] + order[:k]:
                invoke = interps[pair].invoke
                c0, w0 = proc(), perf()
                invoke()
                w1, c1 = perf(), proc()
                block[pair].append(1e6 * (w1 - w0))
                cpu[pair].append(1e6 * (c1 - c0))
        for pair in pairs:
            wall[pair] += block[pair]
            block_median[pair].append(statistics.median(block[pair]))
        del interps
    return {p: {"wall_us": wall[p], "cpu_us": cpu[p], "kind": kinds[p],
                "block_median_us": block_median[p]} for p in pairs}


def _p90(values):
    import numpy as np

    return float(np.percentile(values, 90))


# ----------------------------------------------------------------------------- run

def run_benchmark(*, quantizer, num_bits, estimator, train_steps,
                  train_batch_size, batch_size, runs, warmup, eval_samples,
                  interpreter, data, seed, log=print, model="cnn", blocks=1):
    """Builds, converts, times and verifies; returns a results dict."""
    import keras
    import numpy as np
    import tensorflow as tf

    import mq_keras

    tf.get_logger().setLevel("ERROR")
    factories = interpreter_factories(interpreter)
    train_n = max(REPRESENTATIVE_IMAGES, train_steps * train_batch_size)
    shape = (28, 28, 1) if model == "cnn" else (32, 32, 3)
    if model != "cnn" and data == "mnist":
        raise app.UsageError(f"--model={model} takes 32x32x3 inputs; MNIST is "
                             "for --model=cnn only.")
    x_train, y_train, x_test, y_test, source = load_data(
        data, train_n=min(train_n, 60000), eval_n=min(eval_samples, 10000),
        seed=seed, shape=shape)
    random_data = y_train is None
    if random_data:
        why = ("no prepared MNIST (--data=random)" if data == "random"
               else f"--model={model} reads no dataset" if model != "cnn"
               else "no prepared MNIST found (TFDS_DATA_DIR, "
                    "../shared/tensorflow_datasets)")
        log("!" * 78)
        log("NOTE: " + why
            + ": inputs are RANDOM uniform images and\nnothing is trained. "
            "Sizes and latencies are unaffected; the agreement figures are "
            "those\nof an untrained model on noise.")
        log("!" * 78)
        train_steps = 0
    log(f"Data: {source}; {len(x_test)} evaluation images.")

    float_model, qmodel = build_quantized(
        quantizer=quantizer, num_bits=num_bits, estimator=estimator,
        train_steps=train_steps, train_batch_size=train_batch_size,
        x_train=x_train, y_train=y_train, seed=seed, log=log, model=model)

    blobs, convert_s = {}, {}
    for mode, kwargs in FILES.items():
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blobs[mode] = mq_keras.convert_to_tflite(
                qmodel, **kwargs,
                representative_dataset=(x_train[:REPRESENTATIVE_IMAGES]
                                        if mode == "int8" else None))
        convert_s[mode] = time.perf_counter() - t0
        log(f"  {mode:<12} converted: {len(blobs[mode]):,} bytes "
            f"({convert_s[mode]:.1f} s)")

    # Agreement with Keras, every file through every selected interpreter.
    agreement, kinds = {}, {}
    for name, factory in factories.items():
        for mode in MODES:
            with _verify_with(factory) as built:
                report = mq_keras.verify_tflite(qmodel, blobs[mode], x_test, y_test)
            if not built:
                raise RuntimeError(
                    "mq_keras.verify_tflite did not build its interpreter "
                    "through mq_keras.export.make_interpreter; the "
                    "--interpreter selection would not apply to it.")
            kinds[name] = _kind(built[0])
            agreement[(mode, name)] = report

    x_bench = x_test[:batch_size]
    if len(x_bench) < batch_size:  # fewer eval images than the batch
        x_bench = np.resize(x_test, (batch_size,) + x_test.shape[1:])
    log(f"Timing: batch {batch_size}, {runs} timed invocations per file and "
        f"interpreter in {blocks} block(s) of fresh interpreters, {warmup} "
        "warm-up each, 1 thread, round-robin.")
    timings = time_invocations(blobs, factories, x_bench, runs=runs,
                               warmup=warmup, num_threads=1, blocks=blocks)

    results = {}
    for mode in MODES:
        entry = {
            "bytes": len(blobs[mode]),
            "size_ratio_to_float": len(blobs[mode]) / len(blobs["float"]),
            "convert_s": convert_s[mode],
            "ops": agreement[(mode, next(iter(factories)))]["ops"],
            "const_tensor_types": const_tensor_types(blobs[mode]),
            "interpreters": {},
        }
        for name in factories:
            t = timings[(mode, name)]
            ref = timings[("float", name)]
            a = agreement[(mode, name)]
            block_ratios = [m / f for m, f in zip(t["block_median_us"],
                                                  ref["block_median_us"])]
            r = {
                "interpreter": kinds[name],
                "median_us": statistics.median(t["wall_us"]),
                "p90_us": _p90(t["wall_us"]),
                "min_us": min(t["wall_us"]),
                "cpu_median_us": statistics.median(t["cpu_us"]),
                "median_ratio_to_float": (statistics.median(t["wall_us"])
                                          / statistics.median(ref["wall_us"])),
                "p90_ratio_to_float": _p90(t["wall_us"]) / _p90(ref["wall_us"]),
                "block_median_us": t["block_median_us"],
                "block_ratios_to_float": block_ratios,
                "ratio_range": [min(block_ratios), max(block_ratios)],
                "top1_agreement": a["top1_agreement"],
                "max_abs_diff": a["max_abs_diff"],
                "max_rel_diff": a["max_rel_diff"],
                "wall_us": t["wall_us"],
            }
            if "tflite_accuracy" in a:
                r["keras_accuracy"] = a["keras_accuracy"]
                r["tflite_accuracy"] = a["tflite_accuracy"]
            entry["interpreters"][name] = r
        results[mode] = entry

    cross = {}
    if set(factories) == {"tflite", "litert"}:
        # Same file, two runtimes: do they compute the same outputs?
        for mode in MODES:
            outs = {}
            for name in ("tflite", "litert"):
                with _verify_with(factories[name]):
                    outs[name] = mq_keras.export.run_tflite(blobs[mode], x_test)
            cross[mode] = {
                "max_abs_diff": float(np.abs(outs["tflite"] - outs["litert"]).max()),
                "top1_agreement": float(np.mean(outs["tflite"].argmax(-1)
                                                == outs["litert"].argmax(-1))),
            }

    return {
        "config": {
            "model": {"cnn": "examples/mnist.py CNN",
                      "resnet20": "examples/zoo.py ResNet20",
                      "mobilenetv2": "keras.applications.MobileNetV2 32x32x3, "
                                     "weights=None, logits"}[model],
            "architecture": architecture(float_model),
            "files": {mode: {"mode": "weights", **kw} for mode, kw in FILES.items()},
            "quantizer": quantizer, "num_bits": num_bits,
            "estimator": estimator, "train_steps": train_steps,
            "train_batch_size": train_batch_size, "batch_size": batch_size,
            "runs": runs, "blocks": blocks, "warmup": warmup,
            "eval_samples": len(x_test),
            "interpreter": interpreter, "num_threads": 1, "seed": seed,
            "data": source, "random_data": random_data,
            "timing": "Interpreter.invoke() only, one fixed input batch; "
                      "round-robin over (file, interpreter); median/p90 of runs",
        },
        "environment": {
            "python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "ai_edge_litert": litert_version(),
            "interpreters": kinds, "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        },
        "results": results,
        "tflite_vs_litert": cross,
    }


def format_table(report):
    res = report["results"]
    names = list(next(iter(res.values()))["interpreters"])
    has_acc = "tflite_accuracy" in res["float"]["interpreters"][names[0]]
    header = (f"{'file':<13}{'interp':<8}{'bytes':>10}{'x float':>8}"
              f"{'med us':>9}{'p90 us':>9}{'CPU us':>9}{'med x fl':>9}"
              f"{'blocks x fl':>13}{'p90 x fl':>9}{'top-1 agr':>10}"
              f"{'max|dlogit|':>12}" + (f"{'acc':>8}" if has_acc else ""))
    lines = [header, "-" * len(header)]
    for mode, e in res.items():
        for name in names:
            r = e["interpreters"][name]
            label = r["interpreter"] if name == "auto" else name
            lo, hi = r["ratio_range"]
            lines.append(
                f"{mode:<13}{label:<8}{e['bytes']:>10,}{e['size_ratio_to_float']:>8.3f}"
                f"{r['median_us']:>9.1f}{r['p90_us']:>9.1f}{r['cpu_median_us']:>9.1f}"
                f"{r['median_ratio_to_float']:>9.2f}{f'{lo:.2f}-{hi:.2f}':>13}"
                f"{r['p90_ratio_to_float']:>9.2f}"
                f"{r['top1_agreement']:>10.4f}{r['max_abs_diff']:>12.2e}"
                + (f"{r['tflite_accuracy']:>8.4f}" if has_acc else ""))
    return "\n".join(lines)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # the converter's SavedModel notes
    runs, warmup, eval_samples, train_steps, blocks = (
        FLAGS.runs, FLAGS.warmup, FLAGS.eval_samples, FLAGS.train_steps,
        FLAGS.blocks)
    if FLAGS.smoke:
        runs, warmup, eval_samples, train_steps, blocks = 5, 1, 20, 0, 1
    elif runs < MIN_RUNS:
        raise app.UsageError(f"--runs must be >= {MIN_RUNS} (got {runs}); "
                             "only --smoke runs fewer.")
    if min(FLAGS.batch_size, eval_samples, FLAGS.train_batch_size) < 1:
        raise app.UsageError("--batch_size, --eval_samples and "
                             "--train_batch_size must be >= 1.")
    if warmup < 0 or train_steps < 0:
        raise app.UsageError("--warmup and --train_steps must be >= 0.")
    if not 1 <= blocks <= runs:
        raise app.UsageError(f"--blocks must be between 1 and --runs ({runs}); "
                             f"got {blocks}.")
    if FLAGS.model != "cnn":
        train_steps = 0  # random 32x32x3 images: nothing to learn

    print(f"TFLite benchmark: {FLAGS.model}, {FLAGS.num_bits}-bit "
          f"{FLAGS.quantizer}, train_steps {train_steps}"
          f"{' (x2: float, then ' + FLAGS.estimator + ')' if train_steps else ''}, "
          f"interpreter {FLAGS.interpreter}.")
    report = run_benchmark(
        quantizer=FLAGS.quantizer, num_bits=FLAGS.num_bits,
        estimator=FLAGS.estimator, model=FLAGS.model, blocks=blocks,
        train_steps=train_steps, train_batch_size=FLAGS.train_batch_size,
        batch_size=FLAGS.batch_size, runs=runs, warmup=warmup,
        eval_samples=eval_samples, interpreter=FLAGS.interpreter,
        data=FLAGS.data, seed=FLAGS.seed,
    )
    env, cfg = report["environment"], report["config"]
    print()
    print(f"TF {env['tensorflow']}, Keras {env['keras']}, ai-edge-litert "
          f"{env['ai_edge_litert'] or 'not installed'}; interpreters: "
          + ", ".join(f"{k} -> {v}" for k, v in env["interpreters"].items())
          + f"; {env['cpu_count']} CPUs.")
    print(f"Latency: batch {cfg['batch_size']}, 1 thread, median / p90 of "
          f"{cfg['runs']} invoke() calls per row in {cfg['blocks']} block(s) of "
          f"fresh interpreters ({cfg['warmup']} warm-up each), rows interleaved; "
          "ratios to the float file in the same interpreter; 'blocks x fl': "
          "lowest-highest of the blocks' median ratios.")
    print(f"Agreement: {cfg['eval_samples']} images of {cfg['data']} vs the "
          "Keras quantized model" + ("; acc = the file's test accuracy."
                                     if not cfg["random_data"] else "."))
    print(format_table(report))
    first = next(iter(report["results"]["float"]["interpreters"].values()))
    if "keras_accuracy" in first:
        print(f"  Keras quantized model accuracy on these images: "
              f"{first['keras_accuracy']:.4f}")
    for mode, e in report["results"].items():
        print(f"  {mode:<13} constant tensors: "
              + ", ".join(f"{k} x{v}" for k, v in e["const_tensor_types"].items()))
    if report["tflite_vs_litert"]:
        print("Same file, tf.lite vs LiteRT outputs: " + "; ".join(
            f"{m} max|d| {c['max_abs_diff']:.2e}, top-1 {c['top1_agreement']:.4f}"
            for m, c in report["tflite_vs_litert"].items()))
    if cfg["random_data"]:
        print("NOTE: RANDOM inputs, untrained model"
              + (" (no prepared MNIST)." if FLAGS.model == "cnn" else "."))
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"Wrote {FLAGS.output_json}")


if __name__ == "__main__":
    app.run(main)
