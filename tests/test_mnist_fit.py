"""A short fit on real MNIST (prepared tfds data, offline) with 1-bit weights.

Both the plain STE and MetaQuant (MultiFC) must reach clearly better than
chance (10%) on held-out digits from random initialisation in two short
epochs. Plain SGD, the paper's setting for its headline comparison.
"""

import numpy as np
import keras
import pytest

import mq_keras as mqk

pytestmark = pytest.mark.usefixtures("mnist_available")


def _load():
    import tensorflow_datasets as tfds

    def split(name):
        x, y = tfds.as_numpy(tfds.load("mnist", split=name, batch_size=-1,
                                       as_supervised=True))
        return x.astype("float32") / 255.0, y

    return split("train[:4096]"), split("test[:2000]")


def _net():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(16, 3, strides=2), keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Conv2D(32, 3, strides=2), keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Flatten(), keras.layers.Dense(10),
    ])


@pytest.mark.parametrize("estimator,meta", [("ste", None), ("metaquant", "multifc")])
def test_one_bit_mnist_beats_chance(estimator, meta):
    (xtr, ytr), (xte, yte) = _load()
    q = mqk.quantize_model(_net(), kernel_quantizer="dorefa", num_bits=1,
                           estimator=estimator, meta_network=meta or "multifc",
                           verbose=False)
    q.compile(optimizer=keras.optimizers.SGD(0.05),
              meta_optimizer=mqk.PaperAdam(1e-3) if meta else None,
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              metrics=["accuracy"])
    q.fit(xtr, ytr, batch_size=64, epochs=2, verbose=0)
    acc = q.evaluate(xte, yte, verbose=0, return_dict=True)["accuracy"]
    assert acc > 0.5, acc
    # Every kernel the model computes with is 1-bit.
    for w in q.wrappers:
        for k in w.quantized_kernels().values():
            assert set(np.unique(k)) <= {-1.0, 1.0}
