"""Trains a tiny quantized model under a tf.distribute strategy; saves every variable.

Run by tests/test_distributed.py in child processes, because logical devices
and MultiWorkerMirroredStrategy must be set up before TensorFlow does anything
else in a process.

    python tests/distributed_worker.py --mode mirrored --out r.npz CONFIG...
    TF_CONFIG=... python tests/distributed_worker.py --mode multiworker ...

In `mirrored_mixed` mode each config is trained once, mirrored, under
`mixed_float16` with unsynchronised BN and a NaN in two batches; the npz
holds `<config>/skipped`, `<config>/scale` and `<config>/finite`.

CONFIG is `meta:semantics:bn[:meta_chunk_size]` (e.g. `lstmfc:paper:bn`,
`ste:code:nobn`, `lstmfc:code:nobn:100`). In
`mirrored` mode each config is trained twice, on one device and mirrored over
two logical CPU devices, with the same global batch; the npz holds
`<config>/<one|two>/<i>` for the i-th state array (model variables, then the
base, then the meta optimizer's variables) and `<config>/<one|two>/loss`.
"""

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 1)).astype("float32")
    return x, rng.integers(0, 3, size=64)


def _build(config, sync_bn=True):
    import keras
    import mq_keras as mqk

    meta, semantics, bn, *chunk = config.split(":")
    chunk = int(chunk[0]) if chunk else None
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, name="c1")(inp)
    if bn == "bn":
        # Synchronised BN sees the global batch, as one device does.
        h = keras.layers.BatchNormalization(synchronized=sync_bn, name="bn")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(3, name="fc")(h)
    # float32 logits (a no-op without a mixed precision policy).
    out = keras.layers.Activation("linear", dtype="float32", name="logits")(h)
    model = keras.Model(inp, out)
    ste = meta == "ste"
    q = mqk.quantize_model(
        model, meta_network=None if ste else meta,
        estimator="ste" if ste else "metaquant", semantics=semantics,
        meta_chunk_size=chunk, verbose=False,
    )
    q.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        meta_optimizer=None if ste else mqk.PaperAdam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return q


def _state(q):
    arrays = [np.asarray(v) for v in q.variables]
    arrays += [np.asarray(v) for v in q.optimizer.variables]
    if q.meta_optimizer is not None:
        arrays += [np.asarray(v) for v in q.meta_optimizer.variables]
    return arrays


def _train(strategy, config, epochs=2):
    x, y = _data()
    with strategy.scope():
        q = _build(config)
    history = q.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    return _state(q), np.asarray(history.history["loss"])


def _train_mixed_with_nans(strategy, config):
    import keras

    x, y = _data()
    x[[5, 40], 0, 0, 0] = np.nan  # one bad sample in 2 of the 4 steps per epoch
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with strategy.scope():
            q = _build(config, sync_bn=False)
        q.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    finite = all(np.all(np.isfinite(np.asarray(v))) for v in q.variables)
    return {"skipped": int(q.skipped_steps.numpy()), "finite": finite,
            "scale": float(q.optimizer.dynamic_scale.numpy())}


def _save(out, results):
    flat = {}
    for key, (arrays, loss) in results.items():
        for i, a in enumerate(arrays):
            flat[f"{key}/{i}"] = a
        flat[f"{key}/loss"] = loss
    np.savez(out, **flat)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=("mirrored", "mirrored_mixed", "multiworker"),
                        required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("configs", nargs="+")
    args = parser.parse_args()

    results = {}
    if args.mode.startswith("mirrored"):
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
    if args.mode == "mirrored_mixed":
        two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        flat = {}
        for config in args.configs:
            for key, value in _train_mixed_with_nans(two, config).items():
                flat[f"{config}/{key}"] = value
        np.savez(args.out, **flat)
        return
    if args.mode == "mirrored":
        one = tf.distribute.OneDeviceStrategy("/cpu:0")
        two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        for config in args.configs:
            results[f"{config}/one"] = _train(one, config)
            results[f"{config}/two"] = _train(two, config)
    else:
        # TF_CONFIG (set by the caller) names the two workers on loopback.
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
        task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        for config in args.configs:
            results[f"{config}/worker{task}"] = _train(strategy, config)
    _save(args.out, results)


if __name__ == "__main__":
    main()
