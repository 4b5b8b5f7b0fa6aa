"""Weight quantizers: forward `Q(A(W))`, the STE backward, and MetaQuant's `calib`.

Every quantizer splits the map from a latent float kernel `W` to the quantized
kernel `W_hat` into two stages, because MetaQuant needs the value in between:

* `pre_quantize(W) -> W_tilde = A(W)`, differentiable (ordinary autograd);
* `quantize(W_tilde) -> W_hat = Q(W_tilde)`, a step function whose backward is
  a straight-through estimator (STE) written with `tf.custom_gradient`.

`calibration(W)` is `dW_tilde/dW`, treated as a constant. MetaQuant multiplies
its meta network's output by it to obtain the gradient it feeds to the base
optimizer (METAQUANT.md sections 1 and 3). For DoReFa and uniform it equals the
STE's `dW_hat/dW` without the gate; BWN and ternary follow the official code,
whose STE gradient carries the scale alpha while their calib is 1.

`channel_axes` names the axes of the kernel that index output channels (the
wrapper knows them per layer type). Per-channel statistics reduce over every
other axis; per-tensor ones reduce over all axes.
"""

import inspect
import numbers

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from mq_keras import gradients

_PACKAGE = "mq_keras"
_TINY = float(np.finfo(np.float32).tiny)


def _reduce_axes(rank, channel_axes):
    """Axes to reduce for per-channel statistics of a rank-`rank` kernel."""
    keep = {a % rank for a in channel_axes}
    return tuple(a for a in range(rank) if a not in keep)


def _check_bits(name, num_bits, allowed):
    # numbers.Integral takes NumPy integers (a bit width from np.arange);
    # bool is an int subclass but never a bit width.
    if isinstance(num_bits, bool) or not isinstance(num_bits, numbers.Integral):
        example = max(allowed)
        try:  # "4" or 4.0: suggest the int it spells
            if int(num_bits) == float(num_bits) and int(num_bits) in allowed:
                example = int(num_bits)
        except (TypeError, ValueError, OverflowError):
            pass
        raise ValueError(
            f"{name}: num_bits must be an int in {sorted(allowed)}, "
            f"got {num_bits!r} ({type(num_bits).__name__}); pass e.g. "
            f"num_bits={example}."
        )
    if num_bits not in allowed:
        raise ValueError(
            f"{name}: num_bits={num_bits} is not supported; allowed values "
            f"are {sorted(allowed)}."
        )
    return int(num_bits)


def _check_flag(name, option, value):
    # bool("no") is True: a string or a number would silently pick a mode.
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f"{name}: {option} must be True or False, got {value!r} "
            f"({type(value).__name__})."
        )
    return bool(value)


def _ste(forward, gate=None, slope=None, factor=None):
    """Returns `x -> forward(x)` whose gradient is `slope * dy [* gate(x)] [* factor(x, dy)]`.

    `slope` is a Python float or a constant tensor broadcastable to `x` (BWN's
    and TWN's alpha); `None` means 1. `factor` is a backward rule other than
    the STE (`mq_keras.gradients`: EWGS, ApproxSign).

    `tf.custom_gradient` keeps the forward value bit-exact (the
    `x + stop_gradient(q - x)` trick would round), which export relies on.
    """

    @tf.custom_gradient
    def fn(x):
        y = forward(x)

        def grad(dy):
            g = dy if slope is None else ops.cast(slope, dy.dtype) * dy
            if factor is not None:
                g = g * ops.cast(factor(x, dy), dy.dtype)
            if gate is None:
                return g
            return g * ops.cast(gate(x), dy.dtype)

        return y, grad

    return fn


class Quantizer:
    """Base class of the weight quantizers.

    Subclasses implement `pre_quantize`, `quantize` and `calibration` and
    describe their grid through `num_levels` and `bits_per_weight`.

    Args:
        num_bits: bit width of the quantized weight.
        gradient: the backward rule: "ste" (default), "ewgs" or, at 1 bit,
            "approx_sign" (`mq_keras.gradients`; each subclass says which it
            defines).
        delta: EWGS' scaling factor (gradient="ewgs" only), in the
            discretizer's domain.
    """

    #: String name accepted by `get`.
    name = None
    #: Allowed `num_bits` values.
    allowed_bits = ()

    def __init__(self, *, num_bits, gradient="ste", delta=0.0):
        self.num_bits = _check_bits(type(self).__name__, num_bits, self.allowed_bits)
        self.gradient, self.delta = gradients.check(
            type(self).__name__, gradient, delta, allowed=self.gradients())

    def gradients(self):
        """The backward rules this quantizer defines at its bit width."""
        return ("ste",)

    def _rule_config(self):
        # Only non-default rules are written, so configs (and files) of STE
        # quantizers stay as they were.
        if self.gradient == "ste":
            return {}
        out = {"gradient": self.gradient}
        if self.delta:
            out["delta"] = self.delta
        return out

    def __call__(self, w, channel_axes=(-1,)):
        """Returns `Q(A(w))` with the STE backward."""
        return self.quantize(self.pre_quantize(w, channel_axes), channel_axes)

    def pre_quantize(self, w, channel_axes=(-1,)):
        """Returns `W_tilde = A(W)` (differentiable)."""
        raise NotImplementedError

    def quantize(self, w_tilde, channel_axes=(-1,)):
        """Returns `W_hat = Q(W_tilde)` with a straight-through backward."""
        raise NotImplementedError

    def calibration(self, w, channel_axes=(-1,)):
        """Returns `calib(W)`, broadcastable to `W`, as a constant."""
        return ops.ones((), dtype=w.dtype)

    def discretizer_step(self, w_tilde, channel_axes=(-1,)):
        """`dW_hat / dx_q`: how the discretizer's domain maps onto `W_hat` (EWGS)."""
        raise ValueError(f"{type(self).__name__} defines no EWGS domain.")

    def residual(self, w_tilde, channel_axes=(-1,)):
        """`x - x_q` in the discretizer's domain, in units of its level step.

        In [-1/2, 1/2]; positive where `W_hat` would grow if `W_tilde`
        snapped to its level, so `sign(dL/dW_hat) * residual` is EWGS'
        asymmetry (`mq_keras.meta_networks.MetaEWGS` reads it). Constant
        (no gradient).
        """
        raise ValueError(
            f"{type(self).__name__} defines no discretizer residual (its levels "
            "are not a uniform grid); use DoReFa, BWN or Uniform.")

    @property
    def defines_residual(self):
        """Whether `residual` is defined for this quantizer."""
        return type(self).residual is not Quantizer.residual

    @property
    def num_levels(self):
        """Maximum number of distinct values per output channel."""
        return 2**self.num_bits

    @property
    def bits_per_weight(self):
        """Storage bits per weight on a packed device format."""
        return self.num_bits

    def num_scales(self, kernel_shape, channel_axes=(-1,)):
        """Number of float32 scale values stored beside the codes."""
        return 1

    def get_config(self):
        return {"num_bits": self.num_bits, **self._rule_config()}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        return type(self) is type(other) and (
            self.get_config() == other.get_config()
        )

    def __hash__(self):
        return hash((type(self).__name__, tuple(self.get_config().items())))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DoReFa(Quantizer):
    """DoReFa-Net k-bit weight quantizer (Zhou et al. 2016), as MetaQuant used it.

    Forward::

        t = tanh(W);  W_tilde = t / (2 * max|t|) + 1/2          (max: stop_gradient)
        W_hat = 2 * round((2^k - 1) * W_tilde) / (2^k - 1) - 1   (round half to even)

    At k = 1, `W_hat = sign(W)` in {-1, +1} (W = 0 maps to -1), no scale.

    Backward (STE): `dL/dW_tilde = 2 * dL/dW_hat`, then autograd through
    `A`, so `dL/dW = (1 - t^2) / max|t| * dL/dW_hat`.

    calib: `(1 - tanh(W)^2) / max|tanh(W)|`, so `calib * dL/dW_hat` is the
    exact STE gradient of `W`.

    Other backward rules (`gradient=`), in the domain `x = W_tilde`,
    `x_q = round(n * W_tilde) / n`, `n = 2^k - 1`:
    "ewgs": `dL/dW_tilde = 2 * dL/dW_hat * (1 + delta * sign(dL/dW_hat) *
    (x - x_q))`; "approx_sign" (k = 1): `dL/dW_tilde = 2 * dL/dW_hat *
    (2 - 2|u|)` with `u = 2 * W_tilde - 1` in [-1, 1].

    Args:
        num_bits: 1 to 8.
        gradient: "ste" (default), "ewgs", or "approx_sign" at 1 bit.
        delta: EWGS' delta.
    """

    name = "dorefa"
    allowed_bits = tuple(range(1, 9))

    def __init__(self, *, num_bits=1, gradient="ste", delta=0.0):
        super().__init__(num_bits=num_bits, gradient=gradient, delta=delta)

    def gradients(self):
        return ("ste", "ewgs", "approx_sign") if self.num_bits == 1 else ("ste", "ewgs")

    def _factor(self, n):
        if self.gradient == "ewgs":
            delta = self.delta
            return lambda x, dy: gradients.ewgs_factor(dy, x - ops.round(n * x) / n, delta)
        if self.gradient == "approx_sign":
            return lambda x, dy: gradients.approx_sign_factor(2.0 * x - 1.0)
        return None

    def pre_quantize(self, w, channel_axes=(-1,)):
        t = ops.tanh(w)
        max_t = ops.stop_gradient(ops.max(ops.abs(t)))
        # A zero kernel would give 0/0; any positive divisor maps it to 1/2.
        max_t = ops.where(max_t > 0, max_t, ops.ones_like(max_t))
        return t / (2.0 * max_t) + 0.5

    def quantize(self, w_tilde, channel_axes=(-1,)):
        n = float(2**self.num_bits - 1)
        # (2*round(n*x) - n) / n is 2*round(n*x)/n - 1 with one rounding
        # instead of a cancellation near 0 (an error of ulp(1), 1e-5 relative
        # on the smallest 6-bit level); the numerator is an exact odd integer,
        # so each level is the float32 nearest to odd/n, as export stores it.
        # d/dx with round's STE derivative 1 is 2.
        return _ste(lambda x: (2.0 * ops.round(n * x) - n) / n, slope=2.0,
                    factor=self._factor(n))(w_tilde)

    def calibration(self, w, channel_axes=(-1,)):
        t = ops.tanh(w)
        max_t = ops.max(ops.abs(t))
        max_t = ops.where(max_t > 0, max_t, ops.ones_like(max_t))
        return ops.stop_gradient((1.0 - ops.square(t)) / max_t)

    def discretizer_step(self, w_tilde, channel_axes=(-1,)):
        return 2.0  # W_hat = 2 * x_q - 1

    def residual(self, w_tilde, channel_axes=(-1,)):
        # x = W_tilde, x_q = round(n x) / n: in level units n (x - x_q).
        u = float(2**self.num_bits - 1) * ops.stop_gradient(w_tilde)
        return u - ops.round(u)

    def num_scales(self, kernel_shape, channel_axes=(-1,)):
        return 0  # levels are fixed odd multiples of 1/(2^k - 1)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BWN(Quantizer):
    """Binary weight network quantizer (Rastegari et al. 2016).

    Forward: `W_tilde = W`; `W_hat = alpha * sign(W_tilde)` with
    `alpha = mean|W_tilde|` over the whole kernel (or over each output channel
    when `per_channel=True`), under stop_gradient. sign(0) = +1: the
    reference has sign(0) = 0, a third level that a 1-bit kernel cannot
    store; exact zeros are measure-zero in training, so this only matters
    for hand-made kernels, and it keeps every kernel on two levels.

    Backward (STE with the hard-tanh gate), as the official code computes it
    (`alpha * Function_BWN(W)` with alpha detached and the STE on the sign
    alone): `dL/dW = alpha * dL/dW_hat * 1[|W| <= 1]`.

    calib: 1, as in the official code, so MetaQuant's update of W is
    `calib * m = m`: the meta output replaces the STE gradient *without* the
    alpha that the STE carries. The alpha still enters the meta step through
    the look-ahead: the code semantics back-propagates the loss through
    `V = W - lr * m` and this STE, so `dL/dm = -lr * alpha * dL/dW_hat(V) *
    1[|V| <= 1]`; the paper semantics' Eq. 8 uses `calib(V) * m` as dL/dV
    and so sees no alpha at all.

    gradient="approx_sign": the gate and slope 1 become ApproxSign's
    `2 - 2|u|` on `u = W / max|W|` (per tensor, or per channel with
    `per_channel`), so `dL/dW = alpha * dL/dW_hat * (2 - 2|u|)`: the
    normalized input makes the surrogate independent of the weights' scale.

    Args:
        num_bits: must be 1.
        per_channel: one alpha per output channel instead of per tensor.
        gradient: "ste" (default) or "approx_sign".
    """

    name = "bwn"
    allowed_bits = (1,)

    def __init__(self, *, num_bits=1, per_channel=False, gradient="ste", delta=0.0):
        super().__init__(num_bits=num_bits, gradient=gradient, delta=delta)
        self.per_channel = _check_flag(
            type(self).__name__, "per_channel", per_channel
        )

    def pre_quantize(self, w, channel_axes=(-1,)):
        return w

    def gradients(self):
        return ("ste", "approx_sign")

    def _alpha(self, x, channel_axes, reduce=ops.mean):
        if self.per_channel:
            axes = _reduce_axes(len(x.shape), channel_axes)
            return reduce(ops.abs(x), axis=axes, keepdims=True)
        return reduce(ops.abs(x))

    def quantize(self, w_tilde, channel_axes=(-1,)):
        alpha = ops.stop_gradient(self._alpha(w_tilde, channel_axes))
        forward = lambda x: ops.where(x >= 0, alpha, -alpha)  # noqa: E731
        if self.gradient == "approx_sign":
            top = ops.stop_gradient(self._alpha(w_tilde, channel_axes, ops.max))
            top = ops.where(top > 0, top, ops.ones_like(top))
            return _ste(forward, slope=alpha,
                        factor=lambda x, dy: gradients.approx_sign_factor(x / top))(w_tilde)
        # W_hat = alpha * sign(W): the STE replaces d sign/dW by the gate, so
        # the gradient keeps the factor alpha.
        fn = _ste(forward, gate=lambda x: ops.abs(x) <= 1.0, slope=alpha)
        return fn(w_tilde)

    def residual(self, w_tilde, channel_axes=(-1,)):
        # ApproxSign's domain u = W / max|W| in [-1, 1], levels -1 and +1
        # (sign(0) = +1 as the forward): in level units (u - sign(u)) / 2.
        w = ops.stop_gradient(w_tilde)
        top = self._alpha(w, channel_axes, ops.max)
        u = w / ops.where(top > 0, top, ops.ones_like(top))
        return 0.5 * (u - ops.where(u >= 0, 1.0, -1.0))

    @property
    def num_levels(self):
        return 2

    def num_scales(self, kernel_shape, channel_axes=(-1,)):
        return _num_channels(kernel_shape, channel_axes) if self.per_channel else 1

    def get_config(self):
        return {"num_bits": self.num_bits, "per_channel": self.per_channel,
                **self._rule_config()}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Ternary(Quantizer):
    """Ternary weight network quantizer (TWN, Li et al. 2016).

    Forward: `W_tilde = W`; `delta = 0.7 * mean|W|`;
    `alpha = mean(|W| where |W| > delta)` (0 if none);
    `W_hat = alpha * sign(W) * 1[|W| > delta]`, in {-alpha, 0, +alpha}.
    Statistics are per tensor, or per output channel with `per_channel=True`,
    under stop_gradient.

    Backward (STE on the ternary function t(W) in {-1, 0, 1}, the same
    convention as BWN): `dL/dW = alpha * dL/dW_hat * 1[|W| <= 1]`.
    Per-channel alphas scale each channel's gradient by its own alpha; a
    channel with no weight above delta has alpha = 0 and gets no gradient.

    calib: 1 (as BWN: MetaQuant's update of W is the meta output itself).

    Args:
        num_bits: must be 2 (three levels stored in two bits).
        per_channel: statistics per output channel instead of per tensor.
    """

    name = "ternary"
    allowed_bits = (2,)

    def __init__(self, *, num_bits=2, per_channel=False, gradient="ste", delta=0.0):
        super().__init__(num_bits=num_bits, gradient=gradient, delta=delta)
        self.per_channel = _check_flag(
            type(self).__name__, "per_channel", per_channel
        )

    def pre_quantize(self, w, channel_axes=(-1,)):
        return w

    def quantize(self, w_tilde, channel_axes=(-1,)):
        if self.per_channel:
            axes = _reduce_axes(len(w_tilde.shape), channel_axes)
        else:
            axes = None
        a = ops.stop_gradient(ops.abs(w_tilde))
        delta = 0.7 * ops.mean(a, axis=axes, keepdims=True)
        mask = ops.cast(a > delta, a.dtype)
        count = ops.sum(mask, axis=axes, keepdims=True)
        total = ops.sum(a * mask, axis=axes, keepdims=True)
        alpha = total / ops.maximum(count, 1.0)
        # W_hat = alpha * t(W); the STE passes dL/dt = alpha * dL/dW_hat.
        fn = _ste(
            lambda x: alpha * ops.sign(x) * mask,
            gate=lambda x: ops.abs(x) <= 1.0,
            slope=alpha,
        )
        return fn(w_tilde)

    @property
    def num_levels(self):
        return 3

    def num_scales(self, kernel_shape, channel_axes=(-1,)):
        return _num_channels(kernel_shape, channel_axes) if self.per_channel else 1

    def get_config(self):
        return {"num_bits": self.num_bits, "per_channel": self.per_channel,
                **self._rule_config()}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Uniform(Quantizer):
    """Uniform symmetric k-bit quantizer with a per-channel scale.

    Forward: `W_tilde = W`; `n = 2^(k-1) - 1`; `s = max|W| / n` per output
    channel (per tensor with `per_channel=False`), under stop_gradient;
    `W_hat = s * round(W / s)` (round half to even), in {-n*s, ..., n*s}.
    The range covers max|W|, so nothing is clipped.

    Backward (STE): `dL/dW = dL/dW_hat`. With gradient="ewgs", in the
    domain of steps `x = W / s`, `x_q = round(x)`:
    `dL/dW = dL/dW_hat * (1 + delta * sign(dL/dW_hat) * (x - x_q))`.

    calib: 1.

    Args:
        num_bits: 2 to 8.
        per_channel: one scale per output channel (default) or per tensor.
        gradient: "ste" (default) or "ewgs".
        delta: EWGS' delta.
    """

    name = "uniform"
    allowed_bits = tuple(range(2, 9))

    def __init__(self, *, num_bits, per_channel=True, gradient="ste", delta=0.0):
        super().__init__(num_bits=num_bits, gradient=gradient, delta=delta)
        self.per_channel = _check_flag(
            type(self).__name__, "per_channel", per_channel
        )

    def pre_quantize(self, w, channel_axes=(-1,)):
        return w

    def scale(self, w_tilde, channel_axes=(-1,)):
        """The step `s` between adjacent levels (stop_gradient)."""
        n = float(2 ** (self.num_bits - 1) - 1)
        axes = (
            _reduce_axes(len(w_tilde.shape), channel_axes)
            if self.per_channel
            else None
        )
        m = ops.max(ops.abs(w_tilde), axis=axes, keepdims=True)
        # An all-zero channel keeps s = 1 so that it stays exactly zero.
        m = ops.where(m > 0, m, ops.full_like(m, n))
        # A step below float32's smallest normal would be flushed to zero
        # (W / s -> inf, NaN output); clamping keeps |W / s| <= n and W_hat finite.
        return ops.stop_gradient(ops.maximum(m / n, _TINY))

    def quantize(self, w_tilde, channel_axes=(-1,)):
        s = self.scale(w_tilde, channel_axes)
        factor = None
        if self.gradient == "ewgs":
            delta = self.delta
            factor = lambda x, dy: gradients.ewgs_factor(  # noqa: E731
                dy, x / s - ops.round(x / s), delta)
        return _ste(lambda x: s * ops.round(x / s), factor=factor)(w_tilde)

    def gradients(self):
        return ("ste", "ewgs")

    def discretizer_step(self, w_tilde, channel_axes=(-1,)):
        return self.scale(w_tilde, channel_axes)  # W_hat = s * x_q

    def residual(self, w_tilde, channel_axes=(-1,)):
        x = ops.stop_gradient(w_tilde) / self.scale(w_tilde, channel_axes)
        return x - ops.round(x)  # the step is 1 in the domain x = W / s

    @property
    def num_levels(self):
        return 2**self.num_bits - 1

    def num_scales(self, kernel_shape, channel_axes=(-1,)):
        return _num_channels(kernel_shape, channel_axes) if self.per_channel else 1

    def get_config(self):
        return {"num_bits": self.num_bits, "per_channel": self.per_channel,
                **self._rule_config()}


def _num_channels(shape, channel_axes):
    n = 1
    for a in channel_axes:
        n *= int(shape[a])
    return n


_REGISTRY = {cls.name: cls for cls in (DoReFa, BWN, Ternary, Uniform)}


def _options_of(cls):
    """Keyword options of a quantizer class besides `num_bits`."""
    params = inspect.signature(cls.__init__).parameters.values()
    return sorted(
        p.name for p in params
        if p.name not in ("self", "num_bits")
        and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    )


def _check_instance_args(quantizer, num_bits, options):
    """An instance carries its own settings: refuse others instead of ignoring them."""
    if options:
        raise ValueError(
            f"Quantizer options {sorted(options)} only apply to a quantizer "
            f"given by name, not to the instance {quantizer!r}; set them on "
            f"the instance instead, e.g. {type(quantizer).__name__}("
            f"{', '.join(f'{k}={v!r}' for k, v in sorted(options.items()))})."
        )
    if num_bits is not None and num_bits != quantizer.num_bits:
        raise ValueError(
            f"num_bits={num_bits!r} conflicts with the quantizer instance "
            f"{quantizer!r}; drop num_bits, or pass "
            f"{type(quantizer).__name__}(num_bits={num_bits!r}) itself."
        )
    return quantizer


def get(identifier, *, num_bits=None, **options):
    """Returns a quantizer from a name, a config dict or an instance.

    Args:
        identifier: one of "dorefa", "bwn", "ternary", "uniform", a `Quantizer`
            instance (returned as is), or a serialized quantizer dict.
        num_bits: bit width, for a string identifier. `None` takes the
            quantizer's own default where it has one (bwn: 1, ternary: 2).
            With an instance or a dict it may only repeat their bit width.
        **options: extra keyword options of the quantizer (`per_channel`),
            for a string identifier only.

    Raises:
        ValueError: unknown name, an option the quantizer does not take, a bit
            width the quantizer does not take, or `num_bits` / options that
            contradict a quantizer instance.
    """
    if isinstance(identifier, Quantizer):
        return _check_instance_args(identifier, num_bits, options)
    if isinstance(identifier, dict):
        quantizer = keras.saving.deserialize_keras_object(identifier)
        if not isinstance(quantizer, Quantizer):
            raise ValueError(
                f"kernel_quantizer config {identifier!r} describes a "
                f"{type(quantizer).__name__}, not a Quantizer; pass a "
                "serialized quantizer (mq_keras.quantizers.serialize(q))."
            )
        return _check_instance_args(quantizer, num_bits, options)
    if not isinstance(identifier, str):
        raise ValueError(
            f"kernel_quantizer must be a string, a dict or a Quantizer, got "
            f"{identifier!r}; pass one of {sorted(_REGISTRY)} or an instance "
            f"such as mq_keras.DoReFa(num_bits=2)."
        )
    key = identifier.lower()
    if key not in _REGISTRY:
        raise ValueError(
            f"Unknown kernel_quantizer {identifier!r}; allowed names are "
            f"{sorted(_REGISTRY)}."
        )
    cls = _REGISTRY[key]
    allowed = _options_of(cls)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = (f"its options are {allowed}" if allowed
                 else "it takes no option besides num_bits")
        raise ValueError(
            f"Bad option for quantizer {identifier!r}: unknown option(s) "
            f"{unknown}; {takes}."
        )
    kwargs = dict(options)
    if num_bits is not None:
        kwargs["num_bits"] = num_bits
    elif cls is DoReFa:
        kwargs["num_bits"] = 1
    elif cls is Uniform:
        kwargs["num_bits"] = 8
    return cls(**kwargs)


def with_gradient(quantizer, gradient):
    """`quantizer` with its backward rule set to `gradient` (a new instance).

    Raises:
        ValueError: the quantizer does not define that rule, or already uses
            another one.
    """
    config = quantizer.get_config()
    if quantizer.gradient not in ("ste", gradient):
        raise ValueError(
            f"{quantizer!r} already uses gradient={quantizer.gradient!r}; "
            f"estimator={gradient!r} would replace it. Pass one of them."
        )
    config["gradient"] = gradient
    return type(quantizer).from_config(config)


def serialize(quantizer):
    return keras.saving.serialize_keras_object(quantizer)
