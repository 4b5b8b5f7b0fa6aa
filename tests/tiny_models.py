"""The tiny model that many tests quantize (not a test module)."""

import keras


def tiny_cnn():
    """Conv2D(4, 3) -> BatchNormalization -> ReLU -> Flatten -> Dense(3), on 8x8x1.

    Two quantizable kernels (36 and 432 weights), one BN layer; built, with
    fresh random weights on each call.
    """
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, name="c1")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inp, keras.layers.Dense(3, name="fc")(x), name="cnn")
