r"""The keras.applications zoo, quantized: wrap, train, save, export, verify.

What is measured, per family (one table row each):
    The family's model is built by `keras.applications` with `weights=None`
    (no download), `classes=10`, `classifier_activation=None` (logits) and
    the smallest input the family accepts (32x32, Xception 71x71,
    InceptionV3 75x75). `mq_keras.quantize_model(model, num_bits=...)`
    wraps it (``--quantizer``, default DoReFa, ``--num_bits``, default 4;
    every kernel).

    * ``kernels``: quantized kernels / kernels (weights of rank >= 2) of the
      float model; ``quant %``: `mq_keras.summary(q)["quantized_fraction"]`,
      the share of kernel weights quantized.
    * ``step x``: training-step cost vs float: the float model and the
      quantized model (MetaQuant: MultiFC meta network, PaperAdam 1e-3 meta
      optimizer; SGD ``--lr`` base optimizer, as in examples/mnist.py) are
      trained side by side with `fit` on the same ``--train_steps`` batches
      of ``--batch_size``, in ``--rounds`` alternating rounds (round r: float
      then quantized, or the reverse on odd rounds); the first round traces
      the step functions and is not timed. A Keras callback reads the clock
      at `on_train_batch_begin` / `on_train_batch_end` (the step function
      and its input fetch; not the per-`fit` setup). Ratio of the medians,
      quantized / float. A quantized step that MetaQuantModel skips
      (non-finite loss or gradients; `skipped_steps`) is reported as the
      train stage's error.
    * After training (``--recalibrate_bn``, default on), the quantized
      model's BatchNormalization moving statistics are set to those of the
      representative images: a few steps leave them near their initial
      values, and the untrained model's inference outputs then overflow
      int8 ranges (MobileNetV3Small's int8 file was refused without it).
    * ``.keras``: the trained quantized model is saved, loaded
      (`keras.saving.load_model`, safe mode, no custom objects) and both
      predict the evaluation images: "ok" when the outputs are bitwise equal.
    * ``w/f size``: bytes of `convert_to_tflite(q, mode="weights")` over
      bytes of `mode="float"` (float32 kernels holding Q(W)).
    * ``weights agr / max|d|``, ``int8 agr / max|d|``:
      `mq_keras.verify_tflite` on ``--eval_samples`` held-out images: top-1
      agreement of the TFLite file with the Keras quantized model and the
      largest absolute logit difference (in parentheses: divided by the
      largest |logit|; DoReFa kernels have no scale, so untrained logits can
      be large). int8 is calibrated on the first
      ``--representative_samples`` training images.

    A stage that fails does not stop the script: its exception (type and
    first line of the message) goes into the row's ``error`` column, later
    stages that do not need it still run, and the next family follows.

Data:
    CIFAR-10 through tensorflow-datasets when a prepared copy is found
    (``TFDS_DATA_DIR``, else ``../shared/tensorflow_datasets`` beside the
    repository); images are resized (bilinear) for families whose smallest
    input exceeds 32x32, and each family gets its own documented
    `keras.applications.<module>.preprocess_input` of [0, 255] RGB images.
    Without the data (or with ``--data=random``) the inputs are uniform
    random [0, 255] images with random labels, and the output says so. With
    weights=None and a few training steps the models are untrained either
    way: the figures are about the mechanics (coverage, cost, export
    fidelity), not accuracy.

Example:
    PYTHONPATH=. python examples/applications.py
    PYTHONPATH=. python examples/applications.py \
        --families=MobileNetV3Small,ResNet50 --output_json=/tmp/apps.json
"""

import dataclasses
import gc
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
import warnings

_REPO = pathlib.Path(__file__).resolve().parents[1]
_SHARED_TFDS = _REPO.parent / "shared" / "tensorflow_datasets"
# Must happen before tensorflow_datasets is imported.
if "TFDS_DATA_DIR" not in os.environ and _SHARED_TFDS.is_dir():
    os.environ["TFDS_DATA_DIR"] = str(_SHARED_TFDS)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if str(_REPO / "examples") not in sys.path:
    sys.path.insert(0, str(_REPO / "examples"))  # zoo.py, when imported

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import mq_keras  # noqa: E402
import zoo  # noqa: E402  (examples/zoo.py)
from mq_keras.models import iter_layers  # noqa: E402

NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Family:
    """A keras.applications family: constructor, smallest input, preprocessing."""
    name: str
    module: str  # keras.applications.<module>, which has preprocess_input
    size: int  # smallest square input the constructor accepts
    # Whether the constructor takes classifier_activation (all current ones).
    classifier_activation: bool = True


FAMILIES = (
    Family("MobileNetV2", "mobilenet_v2", 32),
    Family("MobileNetV3Small", "mobilenet_v3", 32),
    Family("MobileNetV3Large", "mobilenet_v3", 32),
    Family("EfficientNetB0", "efficientnet", 32),
    Family("EfficientNetV2B0", "efficientnet_v2", 32),
    Family("ResNet50", "resnet", 32),
    Family("ResNet50V2", "resnet_v2", 32),
    Family("DenseNet121", "densenet", 32),
    Family("NASNetMobile", "nasnet", 32),
    Family("ConvNeXtTiny", "convnext", 32),
    Family("Xception", "xception", 71),
    Family("InceptionV3", "inception_v3", 75),
    Family("VGG16", "vgg16", 32),
)
FAMILY_NAMES = tuple(f.name for f in FAMILIES)


def family(name):
    """The `Family` called `name` (case-insensitive)."""
    for f in FAMILIES:
        if f.name.lower() == name.lower():
            return f
    raise ValueError(f"Unknown family {name!r}; known: {', '.join(FAMILY_NAMES)}.")


def build_float(fam):
    """The family's float model: weights=None, 10 logits, smallest input."""
    kwargs = dict(weights=None, input_shape=(fam.size, fam.size, 3),
                  classes=NUM_CLASSES)
    if fam.classifier_activation:
        kwargs["classifier_activation"] = None
    return getattr(keras.applications, fam.name)(**kwargs)


def preprocess(fam, images):
    """[0, 255] RGB float images -> the family's documented model input."""
    module = getattr(keras.applications, fam.module)
    return np.asarray(module.preprocess_input(np.array(images, np.float32)),
                      np.float32)


# ------------------------------------------------------------------------ data

def load_images(source, *, train_n, eval_n, seed):
    """`(x_train, y_train, x_eval, y_eval, description)`, images in [0, 255].

    32x32 RGB float32 images and int64 labels: CIFAR-10 `train[:train_n]`
    and `test[:eval_n]`, or uniform random images with random labels.
    """
    data_dir = zoo.prepared_tfds_dir("cifar10") if source != "random" else None
    if source == "cifar10" and data_dir is None:
        raise ValueError("--data=cifar10: no prepared CIFAR-10 under "
                         f"TFDS_DATA_DIR or {_SHARED_TFDS}.")
    if data_dir is not None:
        x_tr, y_tr = zoo.cifar10_arrays("train", train_n, normalize=False,
                                        data_dir=data_dir)
        x_ev, y_ev = zoo.cifar10_arrays("test", eval_n, normalize=False,
                                        data_dir=data_dir)
        return (255.0 * x_tr, y_tr, 255.0 * x_ev, y_ev,
                f"CIFAR-10 (tfds, {data_dir})")
    rng = np.random.default_rng(seed)
    return (255.0 * rng.random((train_n, 32, 32, 3), dtype=np.float32),
            rng.integers(0, NUM_CLASSES, train_n).astype(np.int64),
            255.0 * rng.random((eval_n, 32, 32, 3), dtype=np.float32),
            rng.integers(0, NUM_CLASSES, eval_n).astype(np.int64),
            "RANDOM uniform images and labels (no prepared CIFAR-10 used)")


def family_inputs(fam, images):
    """Images resized to the family's input (bilinear) and preprocessed."""
    if images.shape[1] != fam.size:
        images = tf.image.resize(images, (fam.size, fam.size)).numpy()
    return preprocess(fam, np.clip(images, 0.0, 255.0))


# ---------------------------------------------------------------------- stages

def error_text(e):
    """"Type: first line of the message", the row's error text."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def kernel_count(model):
    """Weights of rank >= 2 (kernels) of a float model."""
    return sum(1 for w in model.weights if len(w.shape) >= 2)


class StepTimer(keras.callbacks.Callback):
    """Records each train batch's wall time (seconds) in `times`."""

    def __init__(self):
        super().__init__()
        self.times = []
        self._t0 = None

    def on_train_batch_begin(self, batch, logs=None):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._t0)


def train_side_by_side(float_model, qmodel, x, y, *, batch_size, rounds):
    """Fits both models on the same batches, alternating.

    Returns:
        `(times, losses)`: `{"float": [...], "quantized": [...]}`, the
        seconds of each step of the timed rounds (all but the first), and
        `{"float": loss, "quantized": loss}` of the last round.
    """
    times = {"float": [], "quantized": []}
    models = {"float": float_model, "quantized": qmodel}
    losses = {}
    for r in range(rounds):
        order = ("float", "quantized") if r % 2 == 0 else ("quantized", "float")
        for kind in order:
            timer = StepTimer()
            hist = models[kind].fit(x, y, batch_size=batch_size, epochs=1,
                                    shuffle=False, verbose=0, callbacks=[timer])
            losses[kind] = float(hist.history["loss"][-1])
            if r > 0:
                times[kind].extend(timer.times)
    return times, losses


def recalibrate_batchnorm(qmodel, x):
    """Sets every BatchNormalization's moving statistics to those of batch `x`.

    Runs the quantized graph once in training mode with momentum 0 (the
    momenta are restored afterwards); nothing else changes (no optimizer
    step). Returns the number of BatchNormalization layers.
    """
    bns = [l for l in iter_layers(qmodel.quantized_model)
           if isinstance(l, keras.layers.BatchNormalization)]
    saved = [l.momentum for l in bns]
    try:
        for l in bns:
            l.momentum = 0.0
        qmodel.quantized_model(x, training=True)
    finally:
        for l, m in zip(bns, saved):
            l.momentum = m
    return len(bns)


def run_family(name, *, quantizer="dorefa", num_bits=4, train_steps=4,
               batch_size=8, rounds=3,
               eval_samples=32, representative_samples=16, lr=0.01,
               meta_lr=1e-3, recalibrate_bn=True,
               modes=("float", "weights", "int8"), data="auto", seed=0,
               work_dir=None, images=None, activation_bits=None, log=print):
    """Quantizes, trains, saves, exports and verifies one family.

    Args:
        name: a family name (`FAMILY_NAMES`).
        quantizer: kernel quantizer name ("dorefa", "uniform", "bwn",
            "ternary").
        num_bits: its bit width.
        train_steps: batches per training round.
        batch_size: training batch size.
        rounds: training rounds (>= 2); the first is not timed.
        eval_samples: held-out images for the agreement figures.
        representative_samples: training images calibrating int8.
        lr, meta_lr: base (SGD) and meta (PaperAdam) learning rates.
        recalibrate_bn: after training, set the BatchNormalization moving
            statistics to those of the representative images
            (`recalibrate_batchnorm`); never with `activation_bits`.
        modes: TFLite modes to export and verify ("float", "weights",
            "int8"); the size ratio needs "float" and "weights".
        data: "auto", "cifar10" or "random" (ignored when `images` is given).
        seed: weights, random data.
        work_dir: where the .keras file goes (default: a temp dir, removed).
        images: `load_images(...)` output to reuse across families.
        activation_bits: train with 8-bit (or k-bit) EMA activation
            quantizers and export "int8" from the trained ranges (no
            representative dataset); None: float activations, "int8"
            calibrated on `representative_samples` images.
        log: progress lines.

    Returns:
        A dict (one table row): `family`, `input`, `data`, `kernels`,
        `kernels_quantized`, `quantized_fraction`, `step_s` (medians),
        `step_ratio`, `keras_round_trip` (True / False), `tflite` (per mode:
        `bytes`, `top1_agreement`, `max_abs_diff`), `weights_size_ratio`,
        `stage_s`, `seconds`, `errors` (["stage: Type: message", ...]).
    """
    if rounds < 2:
        raise ValueError(f"rounds must be >= 2 (the first is not timed), got {rounds}.")
    t_family = time.perf_counter()
    fam = family(name)
    row = {"family": fam.name, "input": f"{fam.size}x{fam.size}",
           "errors": [], "stage_s": {}, "tflite": {}}
    n_train = train_steps * batch_size
    if images is None:
        images = load_images(data, seed=seed, eval_n=eval_samples,
                             train_n=max(n_train, representative_samples))
    x_tr, y_tr, x_ev, _, source = images
    row["data"] = source + ("" if fam.size == 32 else
                            f", resized to {fam.size}x{fam.size}")

    def stage(label, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - every failure goes in the row
            row["errors"].append(f"{label}: {error_text(e)}")
            log(f"  {fam.name} {label} FAILED: {error_text(e)}")
            return None
        finally:
            row["stage_s"][label] = round(time.perf_counter() - t0, 2)

    def build():
        keras.utils.set_random_seed(seed)
        return build_float(fam)

    float_model = stage("build", build)
    if float_model is None:
        return _finish(row, t_family)
    row["params"] = int(float_model.count_params())
    row["kernels"] = kernel_count(float_model)
    x_train = family_inputs(fam, x_tr[:n_train])
    y_train = y_tr[:n_train]
    x_eval = family_inputs(fam, x_ev)
    x_rep = family_inputs(fam, x_tr[:representative_samples])

    qmodel = stage("quantize", lambda: mq_keras.quantize_model(
        float_model, kernel_quantizer=quantizer, num_bits=num_bits,
        activation_quantizer="ema" if activation_bits else None,
        activation_bits=activation_bits, verbose=False))
    if qmodel is None:
        return _finish(row, t_family)

    def coverage():
        s = mq_keras.summary(qmodel, print_fn=None)
        row["kernels_quantized"] = sum(len(w.slots) for w in qmodel.wrappers)
        row["quantized_fraction"] = float(s["quantized_fraction"])
        row["compression"] = float(s["compression"])
    stage("summary", coverage)

    def train():
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        float_model.compile(optimizer=keras.optimizers.SGD(lr), loss=loss)
        qmodel.compile(optimizer=keras.optimizers.SGD(lr),
                       meta_optimizer=mq_keras.PaperAdam(meta_lr), loss=loss)
        times, losses = train_side_by_side(float_model, qmodel, x_train,
                                           y_train, batch_size=batch_size,
                                           rounds=rounds)
        med = {k: statistics.median(v) for k, v in times.items()}
        row["step_s"] = med
        row["step_ratio"] = med["quantized"] / med["float"]
        row["loss"] = losses
        # MetaQuantModel skips (and counts) a step whose loss or gradients
        # are not finite; its epoch loss then leaves that step out.
        skipped = int(keras.ops.convert_to_numpy(qmodel.skipped_steps))
        row["skipped_steps"] = skipped
        if skipped:
            hint = ""
            if quantizer == "dorefa" and not any(
                    isinstance(l, keras.layers.BatchNormalization)
                    for l in float_model.layers):
                hint = (" (DoReFa kernels lie in [-1, 1] without a scale and "
                        "the model has no BatchNormalization, so activations "
                        "overflow; try --quantizer=uniform)")
            raise FloatingPointError(
                f"{skipped} of {rounds * train_steps} quantized training steps "
                f"skipped: non-finite loss or gradients{hint}")
        if not all(np.isfinite(v) for v in losses.values()):
            raise FloatingPointError(f"non-finite training loss {losses}")
    stage("train", train)
    # With activation quantizers the ranges were trained under the training
    # statistics; new BatchNorm statistics would move every activation
    # against its range (and such chaotic untrained nets then amplify float
    # round-off between Keras and TFLite into different classes).
    if recalibrate_bn and not activation_bits:
        stage("bn stats", lambda: row.__setitem__(
            "batchnorm_recalibrated", recalibrate_batchnorm(qmodel, x_rep)))

    def round_trip():
        with tempfile.TemporaryDirectory(dir=work_dir) as d:
            path = os.path.join(d, f"{fam.name}.keras")
            qmodel.save(path)
            row["keras_bytes"] = os.path.getsize(path)
            loaded = keras.saving.load_model(path)
            a = qmodel.predict(x_eval, batch_size=64, verbose=0)
            b = loaded.predict(x_eval, batch_size=64, verbose=0)
            with np.errstate(invalid="ignore"):  # inf - inf where equal
                diff = np.where(a == b, 0.0, np.abs(a - b))
            row["keras_round_trip_max_abs_diff"] = float(diff.max())
            row["keras_round_trip"] = bool(np.array_equal(a, b))
            if not row["keras_round_trip"]:
                raise AssertionError(
                    "loaded model predicts differently: max |diff| "
                    f"{row['keras_round_trip_max_abs_diff']:.3g}")
    stage(".keras", round_trip)

    for mode in modes:
        def export(mode=mode):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                calibrate = mode == "int8" and not activation_bits
                blob = mq_keras.convert_to_tflite(
                    qmodel, mode=mode,
                    representative_dataset=x_rep if calibrate else None)
            report = mq_keras.verify_tflite(qmodel, blob, x_eval)
            row["tflite"][mode] = {
                "bytes": len(blob),
                "top1_agreement": report["top1_agreement"],
                "max_abs_diff": report["max_abs_diff"],
                "max_rel_diff": report["max_rel_diff"],
                "flex_ops": report["flex_ops"],
            }
        stage(mode, export)
    t = row["tflite"]
    if "float" in t and "weights" in t:
        row["weights_size_ratio"] = t["weights"]["bytes"] / t["float"]["bytes"]
    del float_model, qmodel
    return _finish(row, t_family)


def _finish(row, t0):

    keras.backend.clear_session()
    gc.collect()
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


# ----------------------------------------------------------------------- table

def _agr(row, mode):
    t = row["tflite"].get(mode)
    if t is None:
        return "-", "-"
    return (f"{t['top1_agreement']:.3f}",
            f"{t['max_abs_diff']:.1e} ({t['max_rel_diff']:.0e})")


def format_table(rows):
    """A markdown table, one row per family.

    max|d| is the largest absolute logit difference, followed in parentheses
    by the same divided by the largest |logit| of the Keras model.
    """
    header = ("| family | input | kernels | quant % | step x | .keras | w/f size "
              "| weights agr | weights max\\|d\\| (rel) | int8 agr "
              "| int8 max\\|d\\| (rel) | s | error |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        kernels = (f"{r['kernels_quantized']}/{r['kernels']}"
                   if "kernels_quantized" in r else "-")
        frac = (f"{100 * r['quantized_fraction']:.1f}"
                if "quantized_fraction" in r else "-")
        step = f"{r['step_ratio']:.2f}" if "step_ratio" in r else "-"
        rt = {True: "ok", False: "DIFF"}.get(r.get("keras_round_trip"), "-")
        size = (f"{r['weights_size_ratio']:.3f}"
                if "weights_size_ratio" in r else "-")
        wa, wd = _agr(r, "weights")
        ia, idd = _agr(r, "int8")
        err = "; ".join(r["errors"]).replace("|", "\\|") or ""
        lines.append(f"| {r['family']} | {r['input']} | {kernels} | {frac} | "
                     f"{step} | {rt} | {size} | {wa} | {wd} | {ia} | {idd} | "
                     f"{r['seconds']:.0f} | {err} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------ main

def _define_flags():
    # Defined only when run as a script, so that tests can import this module
    # beside other examples without duplicate absl flags.
    from absl import flags

    flags.DEFINE_list("families", list(FAMILY_NAMES),
                      "Families to run (comma-separated keras.applications "
                      "constructor names).")
    flags.DEFINE_enum("quantizer", "dorefa", ["dorefa", "uniform", "bwn", "ternary"],
                      "Kernel quantizer.")
    flags.DEFINE_integer("num_bits", 4, "Kernel bit width.")
    flags.DEFINE_integer("activation_bits", 0, "Train with EMA activation quantizers "
                         "of this many bits (2-8) and export int8 from the trained "
                         "ranges; 0: float activations, int8 calibrated after training.",
                         lower_bound=0, upper_bound=8)
    flags.DEFINE_integer("train_steps", 4, "Training batches per round.")
    flags.DEFINE_integer("batch_size", 8, "Training batch size.")
    flags.DEFINE_integer("rounds", 3, "Alternating float/quantized training "
                         "rounds (>= 2; the first traces and is not timed).")
    flags.DEFINE_integer("eval_samples", 32,
                         "Held-out images for .keras and TFLite agreement.")
    flags.DEFINE_integer("representative_samples", 16,
                         "Training images calibrating the int8 export.")
    flags.DEFINE_float("lr", 0.01, "SGD learning rate of the base optimizer.")
    flags.DEFINE_float("meta_lr", 1e-3, "PaperAdam learning rate of the meta network.")
    flags.DEFINE_bool("recalibrate_bn", True,
                      "After training, set the BatchNormalization moving "
                      "statistics to those of the representative images (a "
                      "few training steps leave them near their initial "
                      "values, and the untrained model's inference outputs "
                      "then overflow int8 ranges).")
    flags.DEFINE_enum("data", "auto", ["auto", "cifar10", "random"],
                      "auto: prepared tfds CIFAR-10 if found, else random images; "
                      "cifar10: prepared CIFAR-10 (error if absent); random: "
                      "uniform random images and labels.")
    flags.DEFINE_integer("seed", 0, "Seed of the weights and of random data.")
    flags.DEFINE_string("output_json", None, "Optional path of a JSON report.")


def main(argv):
    del argv
    from absl import app, flags, logging

    FLAGS = flags.FLAGS
    logging.set_verbosity(logging.WARNING)
    tf.get_logger().setLevel("ERROR")
    try:
        names = [family(n).name for n in FLAGS.families]
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if FLAGS.rounds < 2 or min(FLAGS.train_steps, FLAGS.batch_size,
                               FLAGS.eval_samples,
                               FLAGS.representative_samples) < 1:
        raise app.UsageError("--rounds must be >= 2; --train_steps, --batch_size, "
                             "--eval_samples, --representative_samples >= 1.")
    t0 = time.perf_counter()
    try:
        images = load_images(
            FLAGS.data, seed=FLAGS.seed, eval_n=FLAGS.eval_samples,
            train_n=max(FLAGS.train_steps * FLAGS.batch_size,
                        FLAGS.representative_samples))
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    random_data = images[4].startswith("RANDOM")
    print(f"keras.applications zoo: {FLAGS.num_bits}-bit {FLAGS.quantizer}, MetaQuant; "
          f"{FLAGS.rounds} rounds x {FLAGS.train_steps} steps of batch "
          f"{FLAGS.batch_size}; data: {images[4]}.", flush=True)
    if random_data:
        print("NOTE: RANDOM inputs and labels (no prepared CIFAR-10).")
    rows = []
    for name in names:
        print(f"{name} ...", flush=True)
        row = run_family(
            name, quantizer=FLAGS.quantizer, num_bits=FLAGS.num_bits,
            train_steps=FLAGS.train_steps,
            batch_size=FLAGS.batch_size, rounds=FLAGS.rounds,
            eval_samples=FLAGS.eval_samples,
            representative_samples=FLAGS.representative_samples, lr=FLAGS.lr,
            meta_lr=FLAGS.meta_lr, recalibrate_bn=FLAGS.recalibrate_bn,
            seed=FLAGS.seed, images=images,
            activation_bits=FLAGS.activation_bits or None,
            log=lambda s: print(s, flush=True))
        rows.append(row)
        status = "ok" if not row["errors"] else "; ".join(row["errors"])
        print(f"  {name}: {row['seconds']:.0f} s, {status}", flush=True)
    total = time.perf_counter() - t0
    env = {"python": platform.python_version(), "tensorflow": tf.__version__,
           "keras": keras.__version__, "machine": platform.machine(),
           "cpu_count": os.cpu_count()}
    print()
    print(format_table(rows))
    print(f"\nTotal {total:.0f} s for {len(rows)} families; TF {env['tensorflow']}, "
          f"Keras {env['keras']}, {env['cpu_count']} CPUs ({env['machine']}). "
          f"{sum(not r['errors'] for r in rows)}/{len(rows)} families without error.")
    if FLAGS.output_json:
        report = {
            "config": {k: getattr(FLAGS, k) for k in (
                "families", "quantizer", "num_bits", "train_steps", "batch_size", "rounds",
                "eval_samples", "representative_samples", "lr", "meta_lr",
                "recalibrate_bn", "data", "seed")},
            "data": images[4], "random_data": random_data,
            "environment": env, "total_s": total, "rows": rows,
        }
        with open(FLAGS.output_json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"Wrote {FLAGS.output_json}")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
