"""Full-integer TFLite from trained activation ranges: accuracy and Keras agreement.

Trains a model with quantized weights (MetaQuant, `--num_bits`) and 8-bit
fake-quantized activations (`--activation_quantizer`, default "ema"), exports the
full-integer file with no representative dataset (the ranges are the trained
ones) and reports, per seed: Keras test accuracy, TFLite int8 accuracy, top-1
agreement (also with Keras rounding its blocks as the file does,
`mq_keras.file_rounding`), the largest logit difference in output quantization steps, file
size; and the training-step cost of activation quantization (median step
time with vs without it, the two runs interleaved epoch by epoch).

Models:
    mnist        the MNIST CNN of examples/mnist.py from a 1-epoch float start;
    resnet20     CIFAR-10 ResNet20 from the paper's float weights
                 (../shared/pretrained; random start if absent);
    mobilenetv2  keras.applications.MobileNetV2 (alpha 0.35, weights=None) at
                 32x32 on CIFAR-10, from `--float_steps` steps of float
                 training (Adam 1e-3; default 1500, about 5 epochs of the
                 20,000 training images; BatchNorm momentum 0.9).

Run:
    python examples/full_integer.py --model=mnist --seeds=3
    python examples/full_integer.py --model=resnet20 --steps=300 --optimizer=adam --lr=1e-3
    python examples/full_integer.py --model=resnet20 --num_bits=4 --steps=300 \
        --optimizer=adam --lr=1e-3 --tfmot        # TFMOT's file beside ours
    python examples/full_integer.py --model=mobilenetv2 --quantizer=uniform \
        --meta_network=gain_mlp --num_bits=4 --optimizer=adam --lr=1e-3
"""

import json
import os
import statistics
import sys
import time

# Data comes through examples/zoo.py, which points TFDS_DATA_DIR at
# ../shared/tensorflow_datasets when it is unset.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "mnist", ["mnist", "resnet20", "mobilenetv2"], "Which model.")
flags.DEFINE_integer("num_bits", 2, "Weight bits.")
flags.DEFINE_enum("quantizer", "dorefa", ["dorefa", "uniform"],
                  "Weight quantizer. DoReFa's kernels lie in [-1, 1] whatever the float "
                  "scale, which a layer without BatchNorm after it (MobileNetV2's "
                  "classifier) turns into huge logits: use uniform there.")
flags.DEFINE_string("meta_network", "multifc", "Meta network (multifc pairs with DoReFa; "
                    "gain_mlp with uniform).")
flags.DEFINE_integer("activation_bits", 8, "Activation bits.")
flags.DEFINE_enum("activation_quantizer", "ema", ["ema", "pact", "lsq"],
                  "Activation ranges: moving min/max, PACT's trained bounds or LSQ's step.")
flags.DEFINE_integer("steps", 300, "Training steps per run.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adam"], "SGD (momentum 0.9) or Adam.")
flags.DEFINE_float("lr", 0.01, "Learning rate.")
flags.DEFINE_integer("seeds", 3, "Seeds.", lower_bound=1)
flags.DEFINE_integer("test_limit", 10000, "Test images.")
flags.DEFINE_integer("float_steps", None, "Float training steps (Adam 1e-3, batch 64) "
                     "before quantization; default 1500 for mobilenetv2, 0 otherwise "
                     "(mnist trains one float epoch, resnet20 loads the paper's weights).")
flags.DEFINE_bool("tfmot", False, "Also train TFMOT's QAT (default 8-bit scheme at "
                  "--num_bits=8, else its n-bit scheme) from the same float weights with the "
                  "same steps, batch, optimizer and rate, export its full-integer file and "
                  "report its agreement too (needs examples/tfmot_setup.sh; mnist, resnet20).")
flags.DEFINE_string("output_json", None, "Write the results here.")


def _data():
    import zoo

    if FLAGS.model == "mnist":
        return zoo.mnist_arrays("train", 20000), zoo.mnist_arrays("test", FLAGS.test_limit)
    return (zoo.cifar10_arrays("train", 20000),
            zoo.cifar10_arrays("test", FLAGS.test_limit))


def _float_model(x, y):
    import keras
    import zoo

    if FLAGS.model == "mnist":
        model = zoo.small_cnn()
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x[:10000], y[:10000], batch_size=64, epochs=1, verbose=0)
        return model
    if FLAGS.model == "resnet20":
        model = zoo.resnet20()
        path = zoo.default_pretrained_path()
        if path:
            zoo.load_pretrained_resnet20(model, path)
        return model
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                           classes=10, classifier_activation=None)
    # keras.applications builds BatchNorm with momentum 0.999: its inference
    # statistics need thousands of steps, and after a brief training the
    # model predicts one class. 0.9 makes a few hundred steps enough.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    steps = 1500 if FLAGS.float_steps is None else FLAGS.float_steps
    if steps:
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        import tensorflow as tf

        data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0)
        model.fit(data.repeat().batch(64), epochs=1, steps_per_epoch=steps, verbose=0)
    return model


def _quantized(model, *, activations):
    """The compiled quantized model (MetaQuant; SGD with momentum, or Adam)."""
    import keras
    import mq_keras

    q = mq_keras.quantize_model(model, num_bits=FLAGS.num_bits, verbose=False,
                                kernel_quantizer=FLAGS.quantizer, meta_network=FLAGS.meta_network,
                                activation_quantizer=(FLAGS.activation_quantizer
                                                      if activations else None),
                                activation_bits=FLAGS.activation_bits if activations else None)
    optimizer = (keras.optimizers.Adam(FLAGS.lr) if FLAGS.optimizer == "adam"
                 else keras.optimizers.SGD(FLAGS.lr, momentum=0.9))
    q.compile(optimizer=optimizer,
              meta_optimizer=mq_keras.PaperAdam(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              metrics=["accuracy"])
    return q


def _steps(q, x, y, rng, steps):
    times = []
    for _ in range(steps):
        idx = rng.integers(0, len(x), FLAGS.batch_size)
        t = time.perf_counter()
        q.train_on_batch(x[idx], y[idx])
        times.append(time.perf_counter() - t)
    return times


def _tfmot(model, seed):
    """TFMOT's QAT of the same float model and budget: its file's agreement."""
    import tempfile

    import tfmot_runner

    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init.npz")
        tfmot_runner.save_init_weights(model, init)
        r = tfmot_runner.run_tfmot(
            model="small_cnn" if FLAGS.model == "mnist" else "resnet20",
            scheme="default8" if FLAGS.num_bits == 8 else "nbit", num_bits=FLAGS.num_bits,
            activation_bits=FLAGS.activation_bits, epochs=1, steps_per_epoch=FLAGS.steps,
            batch_size=FLAGS.batch_size, optimizer=FLAGS.optimizer, lr=FLAGS.lr,
            momentum=0.9 if FLAGS.optimizer == "sgd" else None, train_limit=20000,
            test_limit=FLAGS.test_limit, no_augment=True, seed=seed, init_weights=init,
            export_tflite=os.path.join(tmp, "tfmot.tflite"), verbose=0)
    t = r["tflite"]
    return dict(tfmot_keras_accuracy=r["final_accuracy"], tfmot_tflite_accuracy=t["accuracy"],
                tfmot_top1_agreement=t["top1_agreement_with_keras"],
                tfmot_tflite_bytes=t["bytes"])


def run_seed(seed):
    import keras
    import numpy as np
    import mq_keras

    keras.utils.set_random_seed(seed)
    (x, y), (xt, yt) = _data()
    model = _float_model(x, y)
    float_accuracy = float(np.mean(model.predict(xt, verbose=0).argmax(-1) == yt))
    plain = _quantized(model, activations=False)
    fq = _quantized(model, activations=True)
    t_plain, t_fq = [], []
    rng_a, rng_b = np.random.default_rng(seed), np.random.default_rng(seed)
    chunk = max(FLAGS.steps // 10, 1)
    for _ in range(FLAGS.steps // chunk):  # interleaved: same batches, same machine state
        t_plain += _steps(plain, x, y, rng_a, chunk)
        t_fq += _steps(fq, x, y, rng_b, chunk)
    blob = mq_keras.convert_to_tflite(fq, mode="int8")
    report = mq_keras.verify_tflite(fq, blob, xt, yt)
    out_layer = [l for l in fq.quantized_model.layers
                 if isinstance(l, mq_keras.ActivationQuantizer)][-1]
    lo, hi = (float(v) for v in out_layer.quantization_range())
    step = (hi - lo) / (2**FLAGS.activation_bits - 1)
    peer = _tfmot(model, seed) if FLAGS.tfmot else {}
    return dict(seed=seed, float_model_accuracy=float_accuracy, **peer,
                keras_accuracy=report["keras_accuracy"],
                tflite_accuracy=report["tflite_accuracy"],
                float_activation_accuracy=float(plain.evaluate(
                    xt, yt, verbose=0, return_dict=True)["accuracy"]),
                top1_agreement=report["top1_agreement"],
                file_rounding_top1_agreement=report.get("file_rounding_top1_agreement"),
                file_rounding_identical=report.get("file_rounding_identical"),
                max_logit_diff_steps=report["max_abs_diff"] / step,
                tflite_bytes=len(blob),
                step_ratio=statistics.median(t_fq[2:]) / statistics.median(t_plain[2:]))


def main(argv):
    del argv
    if FLAGS.tfmot:
        import tfmot_runner

        if FLAGS.model == "mobilenetv2":
            raise app.UsageError("--tfmot covers --model=mnist and resnet20 (the TFMOT "
                                 "peer script builds no MobileNetV2).")
        if not tfmot_runner.tfmot_available():
            raise app.UsageError("--tfmot needs the TFMOT venv: run "
                                 "`bash examples/tfmot_setup.sh` first.")
    results = [run_seed(s) for s in range(FLAGS.seeds)]
    import numpy as np

    print(f"{FLAGS.model}: {FLAGS.quantizer} w{FLAGS.num_bits}a{FLAGS.activation_bits} "
          f"({FLAGS.activation_quantizer}), "
          f"{FLAGS.meta_network}, {FLAGS.steps} steps, "
          f"{FLAGS.seeds} seeds, {FLAGS.optimizer} lr {FLAGS.lr} (mean +- std, then per seed)")
    for key in ("float_model_accuracy", "keras_accuracy", "tflite_accuracy", "float_activation_accuracy",
                "top1_agreement", "file_rounding_top1_agreement", "file_rounding_identical",
                "max_logit_diff_steps", "tflite_bytes", "step_ratio",
                "tfmot_keras_accuracy", "tfmot_tflite_accuracy", "tfmot_top1_agreement",
                "tfmot_tflite_bytes"):
        if results[0].get(key) is None:
            continue
        vals = [r[key] for r in results]
        std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        print(f"  {key:<26}{np.mean(vals):>12.4f} +- {std:.4f}   "
              + " / ".join(f"{v:.4f}" for v in vals))
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
