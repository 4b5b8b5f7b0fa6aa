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


def residual_cnn(*, head="average"):
    """Conv-BN-ReLU, conv-BN + shortcut add, a strided conv with its own ReLU,
    then global average pooling (`head="average"`) or max-pooling and
    flatten (`head="flatten"`: no op between the convolutions and the Dense
    that requantizes), and a Dense."""
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    y = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(x)
    y = keras.layers.BatchNormalization()(y)
    x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    x = keras.layers.Conv2D(24, 3, strides=2, activation="relu")(x)
    if head == "average":
        x = keras.layers.GlobalAveragePooling2D()(x)
    else:
        x = keras.layers.Flatten()(keras.layers.MaxPooling2D()(x))
    return keras.Model(inputs, keras.layers.Dense(5)(x))
