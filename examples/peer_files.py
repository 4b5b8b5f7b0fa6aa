"""Our full-integer files beside TFMOT's: size, LiteRT latency, Keras agreement.

Same net (the MNIST CNN of examples/zoo.py `small_cnn`), same float start
(`--pretrain_steps` of Adam 1e-3), same data and steps: for each scheme,
w8a8 (TFMOT's default 8-bit QAT) and w4a8 / w2a8 (its n-bit scheme), ours
trains with symmetric per-channel weights (`kernel_quantizer="uniform"`, the
STE as estimator) and 8-bit EMA activations, then exports
`convert_to_tflite(mode="int8", io_dtype="int8")`; TFMOT's QAT model is
converted with int8 input and output from its own ranges
(examples/tfmot_peer.py, in the TFMOT venv). Every file, and the float file
of the float start, is then timed in one LiteRT interpreter each (one
thread, batch 1, the files interleaved round by round in `--blocks` blocks,
`benchmark_tflite.time_invocations`); the table gives size, size and
median latency relative to the float file, test accuracy of the file and
its top-1 agreement with the Keras model it came from.

Run (needs the TFMOT venv: examples/tfmot_setup.sh):
    python examples/peer_files.py --seed=0 --runs=300 --blocks=10
"""

import json
import os
import pathlib
import statistics
import sys
import tempfile

# Data comes through examples/zoo.py, which points TFDS_DATA_DIR at
# ../shared/tensorflow_datasets when it is unset.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

# Its timing flags (--runs, --blocks) and --seed, --output_json are shared.
import benchmark_tflite  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("pretrain_steps", 157, "Float steps before quantization.")
flags.DEFINE_integer("steps", 300, "QAT steps (both libraries).")
flags.DEFINE_float("lr", 0.05, "SGD learning rate (both libraries).")
flags.DEFINE_integer("test_limit", 5000, "Test images for accuracy and agreement.")

SCHEMES = (("default8", 8), ("nbit", 4), ("nbit", 2))


def _float_start(x, y):
    import keras
    import tensorflow as tf
    import zoo

    keras.utils.set_random_seed(FLAGS.seed)
    model = zoo.small_cnn()
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=FLAGS.seed)
    model.fit(data.repeat().batch(64), steps_per_epoch=FLAGS.pretrain_steps, epochs=1, verbose=0)
    return model


def _ours(model, bits, x, y, xt, yt):
    import keras
    import numpy as np
    import mq_keras

    keras.utils.set_random_seed(FLAGS.seed)
    q = mq_keras.quantize_model(model, num_bits=bits, kernel_quantizer="uniform",
                                estimator="ste", activation_quantizer="ema", verbose=False)
    q.compile(optimizer=keras.optimizers.SGD(FLAGS.lr),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(FLAGS.seed)
    for _ in range(FLAGS.steps):
        idx = rng.integers(0, len(x), 64)
        q.train_on_batch(x[idx], y[idx])
    blob = mq_keras.convert_to_tflite(q, mode="int8", io_dtype="int8")
    keras_logits = q.predict(xt, verbose=0)
    file_logits = _run_int8(blob, xt)
    return blob, dict(keras_accuracy=float(np.mean(keras_logits.argmax(-1) == yt)),
                      tflite_accuracy=float(np.mean(file_logits.argmax(-1) == yt)),
                      top1_agreement=float(np.mean(file_logits.argmax(-1)
                                                   == keras_logits.argmax(-1))))


def _run_int8(blob, x):
    """Logits of an int8-input/output file (inputs quantized with its input scale)."""
    import numpy as np
    import mq_keras

    interp = mq_keras.export.make_interpreter(blob)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], x.shape)
    interp.allocate_tensors()
    scale, zero = inp["quantization"]
    interp.set_tensor(inp["index"], np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8))
    interp.invoke()
    o_scale, o_zero = out["quantization"]
    return (interp.get_tensor(out["index"]).astype(np.float32) - o_zero) * o_scale


def _tfmot(model, scheme, bits, out_dir):
    import tfmot_runner

    init = os.path.join(out_dir, "init.npz")
    tfmot_runner.save_init_weights(model, init)
    path = os.path.join(out_dir, f"tfmot_{scheme}{bits}.tflite")
    r = tfmot_runner.run_tfmot(
        model="small_cnn", dataset="mnist", scheme=scheme, num_bits=bits, epochs=6,
        steps_per_epoch=FLAGS.steps // 6, optimizer="sgd", lr=FLAGS.lr, batch_size=64,
        train_limit=10000, test_limit=FLAGS.test_limit, init_weights=init, seed=FLAGS.seed,
        export_tflite=path, timeout=1800)
    report = r.get("tflite", {})
    return pathlib.Path(path).read_bytes(), dict(
        keras_accuracy=r.get("final_accuracy"), tflite_accuracy=report.get("accuracy"),
        top1_agreement=report.get("top1_agreement_with_keras"))


def main(argv):
    del argv
    import numpy as np
    import mq_keras
    import tfmot_runner
    import zoo

    x, y = zoo.mnist_arrays("train", 10000)
    xt, yt = zoo.mnist_arrays("test", FLAGS.test_limit)
    model = _float_start(x, y)
    blobs = {"float": mq_keras.convert_to_tflite(model, mode="float")}
    facts = {"float": dict(keras_accuracy=None, tflite_accuracy=None, top1_agreement=None)}
    have_tfmot = tfmot_runner.tfmot_available()
    with tempfile.TemporaryDirectory() as out_dir:
        for scheme, bits in SCHEMES:
            name = f"w{bits}a8"
            blobs[f"ours {name}"], facts[f"ours {name}"] = _ours(model, bits, x, y, xt, yt)
            if have_tfmot:
                blobs[f"tfmot {name}"], facts[f"tfmot {name}"] = _tfmot(model, scheme, bits,
                                                                        out_dir)
    if not have_tfmot:
        print("TFMOT venv absent (examples/tfmot_setup.sh): only our files are timed.")
    factories = benchmark_tflite.interpreter_factories("auto")
    timings = benchmark_tflite.time_invocations(
        blobs, factories, np.zeros((1, 28, 28, 1), np.float32), runs=FLAGS.runs,
        warmup=10, blocks=FLAGS.blocks)
    median = {mode: statistics.median(t["wall_us"]) for (mode, _), t in timings.items()}
    rows = []
    print(f"seed {FLAGS.seed}, {FLAGS.steps} QAT steps, LiteRT 1 thread batch 1, "
          f"{FLAGS.runs} interleaved runs in {FLAGS.blocks} blocks")
    print(f"{'file':<14}{'bytes':>9}{'x float':>9}{'median us':>11}{'x float':>9}"
          f"{'keras acc':>11}{'file acc':>10}{'agree':>8}")
    for mode, blob in blobs.items():
        f = facts[mode]
        row = dict(file=mode, bytes=len(blob), size_ratio=len(blob) / len(blobs["float"]),
                   median_us=median[mode], latency_ratio=median[mode] / median["float"], **f)
        rows.append(row)
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"{mode:<14}{row['bytes']:>9}{row['size_ratio']:>9.3f}{row['median_us']:>11.1f}"
              f"{row['latency_ratio']:>9.2f}{fmt(f['keras_accuracy']):>11}"
              f"{fmt(f['tflite_accuracy']):>10}{fmt(f['top1_agreement']):>8}")
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    app.run(main)
