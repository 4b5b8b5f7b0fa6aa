"""`ActivationQuantizer`: fake-quantized activations whose range is learned in training.

Phones' integer kernels quantize every tensor between ops. Training with the
same rounding in the graph makes the full-integer file compute what training
saw: the TFLite converter reads each range straight from the graph, so the
file's scale and zero point are the trained ones and no representative
dataset is needed.

Forward (TF's `fake_quant_with_min_max_vars`, the op the converter reads):
the range `[lo, hi]` is nudged so that 0 is a level, then
`y = s * (clip(round(x / s + z), 0, 2^k - 1) - z)` with
`s = (hi - lo) / (2^k - 1)` and `z = round(-lo / s)`.

Backward: `dL/dx = dL/dy * 1[lo <= x <= hi]` (straight through inside the
range). With `range_mode="pact"` the bounds are trainable and
`dL/dhi = sum(dL/dy * 1[x > hi])`, `dL/dlo = sum(dL/dy * 1[x < lo])`: the
clipping-level gradient of PACT (Choi et al., 2018, "PACT: Parameterized
Clipping Activation for Quantized Neural Networks"), as TF's gradient of
the op computes it. With `range_mode="lsq"` the range is `[-Q_N s, Q_P s]`
with a trained step `s` and LSQ's step gradient (`mq_keras.lsq`).

Range modes:
    "ema" (default, TFMOT's scheme): `lo`, `hi` are exponential moving
        averages (decay `ema_decay`) of each training batch's min and max,
        extended to include 0; the first batch sets them.
    "pact": `lo`, `hi` are trained by the base optimizer from
        `init_range`, with the gradient above.
    "lsq": a trained step `s` (Esser et al., 2020, "Learned Step Size
        Quantization") on an unsigned grid `[0, (2^k - 1) s]`, or a signed
        one `[-2^(k-1) s, (2^(k-1) - 1) s]`; the first training batch sets
        the sign (its minimum < 0) and `s = 2 mean|x| / sqrt(Q_P)`, the
        paper's start.
    "fixed": `lo`, `hi` stay `init_range`. `quantize_model` puts one after
        each op whose int8 kernel has a fixed output scale (sigmoid and
        softmax: [0, 255/256], scale 1/256; tanh: [-1, 127/128], scale
        1/128), so Keras rounds on the grid the file computes on, with no
        requantize op after it.
"""

import keras
import tensorflow as tf
from keras import ops

from mq_keras import lsq

_PACKAGE = "mq_keras"
RANGE_MODES = ("ema", "pact", "lsq")  # what quantize_model(activation_quantizer=) takes
_ALL_MODES = RANGE_MODES + ("fixed",)
ALLOWED_BITS = tuple(range(2, 9))


def _check(num_bits, range_mode, ema_decay, init_range):
    if isinstance(num_bits, bool) or not isinstance(num_bits, int) or num_bits not in ALLOWED_BITS:
        raise ValueError(
            f"activation_bits must be an int in {list(ALLOWED_BITS)} (TFLite's integer "
            f"kernels hold at most 8 bits), got {num_bits!r}."
        )
    if range_mode not in _ALL_MODES:
        raise ValueError(
            f"Unknown activation_quantizer {range_mode!r}; allowed values are "
            f"{RANGE_MODES} (or None for float activations)."
        )
    if not 0.0 < float(ema_decay) < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay!r}.")
    lo, hi = (float(v) for v in init_range)
    if not lo <= 0.0 <= hi or lo == hi:
        raise ValueError(f"init_range must satisfy lo <= 0 <= hi, lo < hi; got {init_range!r}.")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ActivationQuantizer(keras.layers.Layer):
    """Fake-quantizes its input to `num_bits` levels over a trained range.

    Args:
        num_bits: 2 to 8.
        range_mode: "ema" (moving min/max), "pact" (trainable bounds),
            "lsq" (a trainable step) or "fixed" (`init_range`, never moves).
        ema_decay: decay of the moving averages ("ema").
        init_range: `(lo, hi)` before training ("pact"; "ema" and "lsq"
            start from the first batch), or for good ("fixed").
    """

    def __init__(self, *, num_bits=8, range_mode="ema", ema_decay=0.999,
                 init_range=(-6.0, 6.0), **kwargs):
        super().__init__(**kwargs)
        _check(num_bits, range_mode, ema_decay, init_range)
        self.num_bits = num_bits
        self.range_mode = range_mode
        self.ema_decay = float(ema_decay)
        self.init_range = tuple(float(v) for v in init_range)

    def build(self, input_shape=None):
        lo, hi = self.init_range
        if self.range_mode == "lsq":
            self.step = self.add_weight(
                name="step", shape=(), trainable=True, dtype="float32",
                initializer=keras.initializers.Constant((hi - lo) / (2**self.num_bits - 1)))
            # 1.0: a signed grid (set by the first training batch).
            self.negative = self.add_weight(
                name="negative", shape=(), trainable=False, dtype="float32",
                initializer=keras.initializers.Constant(float(lo < 0.0)))
        else:
            trainable = self.range_mode == "pact"
            self.lo = self.add_weight(name="lo", shape=(), trainable=trainable, dtype="float32",
                                      initializer=keras.initializers.Constant(lo))
            self.hi = self.add_weight(name="hi", shape=(), trainable=trainable, dtype="float32",
                                      initializer=keras.initializers.Constant(hi))
        # "ema", "lsq": 0 until the first training batch has set the range.
        self.seen = self.add_weight(name="seen", shape=(), trainable=False, dtype="float32",
                                    initializer="zeros")
        self.built = True

    def _lsq_grid(self):
        """`(s, Q_N, Q_P)` of "lsq" (`s` kept > 0 whatever the optimizer did)."""
        s = ops.maximum(ops.convert_to_tensor(self.step), 1e-8)
        q_neg = ops.convert_to_tensor(self.negative) * 2.0 ** (self.num_bits - 1)
        return s, q_neg, (2.0**self.num_bits - 1.0) - q_neg

    def quantization_range(self):
        """`(lo, hi)`: the float range the file's scale and zero point come from."""
        if self.range_mode == "lsq":
            s, q_neg, q_pos = self._lsq_grid()
            return -q_neg * s, q_pos * s
        return ops.convert_to_tensor(self.lo), ops.convert_to_tensor(self.hi)

    def _init_step(self, x):
        x = ops.stop_gradient(ops.cast(x, "float32"))
        first = self.seen < 0.5
        negative = ops.cast(ops.min(x) < 0.0, "float32")
        q_pos = (2.0**self.num_bits - 1.0) - negative * 2.0 ** (self.num_bits - 1)
        step = 2.0 * ops.mean(ops.abs(x)) / ops.sqrt(q_pos)
        step = ops.where(step > 0.0, step, self.step)  # an all-zero batch keeps init_range's
        self.negative.assign(ops.where(first, negative, self.negative))
        self.step.assign(ops.where(first, step, self.step))
        self.seen.assign(1.0)

    def set_file_rounding(self, rounding):
        """Inference rounds as a full-integer file's filter op does (or not: None).

        Set by `mq_keras.requantization.file_rounding` on the quantizer of a
        convolution / Dense (+ BatchNorm, + ReLU) block. `rounding` holds
        the op's `acc_scale` (float64, `s_in * s_w` per channel),
        `scale` (float32, XNNPACK's `s_in * s_w / s_out`), `zero_point`,
        `code_min`, `code_max` (int8 codes, the fused activation's clamp)
        and `step` (`s_out`). See `_file_round`.
        """
        # Plain attribute: a dict of arrays, not state Keras should track.
        object.__setattr__(self, "_file_rounding", rounding)

    def _file_round(self, x, r):
        """The file's requantization of the block output `x` (inference only).

        The block's float output is `x = (acc + k) * acc_scale` up to float
        round-off, `acc + k` the op's int32 accumulator plus bias, so
        `a = round(x / acc_scale)` recovers it; then, as XNNPACK's fp32
        requantization: `o = clip(rint(float32(a) * scale) + z, min, max)`
        (half to even), and `y = (o - z) * s_out`.
        """
        x = tf.cast(x, tf.float64)
        acc = tf.round(x / tf.constant(r["acc_scale"], tf.float64))
        v = tf.cast(acc, tf.float32) * tf.constant(r["scale"], tf.float32)
        z = float(r["zero_point"])
        o = tf.clip_by_value(tf.round(v) + z, float(r["code_min"]), float(r["code_max"]))
        return (o - z) * r["step"]

    def _track(self, x):
        x = ops.stop_gradient(ops.cast(x, "float32"))
        lo = ops.minimum(ops.min(x), 0.0)
        hi = ops.maximum(ops.max(x), 0.0)
        first = self.seen < 0.5
        d = self.ema_decay
        self.lo.assign(ops.where(first, lo, d * self.lo + (1.0 - d) * lo))
        self.hi.assign(ops.where(first, hi, d * self.hi + (1.0 - d) * hi))
        self.seen.assign(1.0)

    def call(self, inputs, training=None, track_range=True):
        # track_range=False: a second use of this quantizer (an input of the
        # concatenation whose output it quantizes) that reads the range only.
        if training and self.range_mode == "ema" and track_range:
            self._track(inputs)
        if training and self.range_mode == "lsq" and track_range:
            self._init_step(inputs)
        x = ops.cast(inputs, "float32")
        rounding = getattr(self, "_file_rounding", None)
        if rounding is not None and not training:
            return ops.cast(self._file_round(x, rounding), inputs.dtype)
        if training and self.range_mode == "lsq":
            s, q_neg, q_pos = self._lsq_grid()
            y = lsq.lsq_fake_quant(x, s, q_neg, q_pos, num_bits=self.num_bits)
        else:  # the op (and range) the converter reads
            lo, hi = self.quantization_range()
            y = tf.quantization.fake_quant_with_min_max_vars(
                x, lo, hi, num_bits=self.num_bits, narrow_range=False)
        return ops.cast(y, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "num_bits": self.num_bits,
                "range_mode": self.range_mode, "ema_decay": self.ema_decay,
                "init_range": list(self.init_range)}
