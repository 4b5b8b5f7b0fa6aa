"""Meta networks: the learned map from quantized-weight gradients to weight gradients.

A meta network is shared by every quantized layer and applied coordinate-wise:
each weight element is one row of an `(N, 1)` input. `MetaQuantModel` stacks
the rows of all quantized kernels into one `(N_total, 1)` column (one matmul
instead of one per layer), passing `segment_ids` that say which kernel each row
belongs to, for networks that normalise per kernel.

Every network maps `(g, w_tilde[, state]) -> (m, new_state)` where
`g = dL/dW_hat` and `w_tilde = A(W)` of the previous step (METAQUANT.md
section 4). The weight gradient MetaQuant applies is `calib(W) * m`. A network
whose `weight_input` is "residual" (MetaEWGS) receives instead each kernel's
discretization residual `x - x_q` (`Quantizer.residual`) in that slot.

Initialisation follows the PyTorch defaults of the reference: a Linear layer
with fan-in `f` draws weights from U(-1/sqrt(f), 1/sqrt(f)); the LSTM draws all
weights and both biases from U(-1/sqrt(hidden), 1/sqrt(hidden)).
"""

import inspect
import math
import numbers

import keras
from keras import ops

_PACKAGE = "mq_keras"


def _torch_linear_init(fan_in, seed):
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound, seed=seed)


def _seed(seed, offset):
    return None if seed is None else seed + offset


def _segment_sum_rows(x, segment_ids, num_segments):
    """Per-row copy of the sum of `x` over the rows of its kernel (segment)."""
    if segment_ids is None:
        # Every row gets its copy, so that rows can still be sliced in chunks.
        return ops.broadcast_to(ops.sum(x, axis=0, keepdims=True), ops.shape(x))
    s = ops.segment_sum(x, segment_ids, num_segments=num_segments)
    return ops.take(s, segment_ids, axis=0)


def _safe_sqrt(square):
    # Divide by the root itself (no additive epsilon, which would break scale
    # invariance for small gradients); an all-zero kernel keeps 1.
    root = ops.sqrt(square)
    return ops.where(root > 0, root, ops.ones_like(root))


class MetaNetwork(keras.layers.Layer):
    """Base class: a coordinate-wise network `(g, w_tilde, state) -> (m, state)`.

    Subclasses create their weights in `build()` and implement `call`.

    Args:
        hidden_size: width of the hidden layers.
        seed: optional int for reproducible initialisation.
    """

    #: Floats of recurrent state per weight element (0: stateless).
    state_size = 0
    #: What `MetaQuantModel` passes as the second input: "w_tilde" (`A(W)`)
    #: or "residual" (`Quantizer.residual` of it: `x - x_q` in level units).
    weight_input = "w_tilde"

    def __init__(self, *, hidden_size=100, seed=None, **kwargs):
        # The meta step runs in float32 whatever the global policy: its
        # inputs are gradients (tiny) and its output scales every update.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if self.dtype_policy.compute_dtype != "float32":
            raise ValueError(
                f"Meta networks compute in float32; got dtype "
                f"{self.dtype_policy.name!r}. Leave dtype unset (mixed "
                "precision policies apply to the quantized model only)."
            )
        if (isinstance(hidden_size, bool)
                or not isinstance(hidden_size, numbers.Integral) or hidden_size < 1):
            raise ValueError(
                f"hidden_size must be a positive int, got {hidden_size!r}; "
                "e.g. hidden_size=100 (the reference's)."
            )
        if seed is not None and (isinstance(seed, bool)
                                 or not isinstance(seed, numbers.Integral)):
            raise ValueError(
                f"seed must be an int or None, got {seed!r}."
            )
        self.hidden_size = int(hidden_size)
        self.seed = None if seed is None else int(seed)

    def initial_state(self, num_rows):
        """Zero recurrent state for `num_rows` weight elements."""
        return ()

    def bind_kernels(self, quantizers):
        """Called by `MetaQuantModel` before `build`: the kernels it will see.

        Args:
            quantizers: the `Quantizer` of every kernel, in the order of
                `segment_ids`. Networks with per-kernel weights size them from
                it; the default ignores it.
        """
        del quantizers

    def call(self, grad, w_tilde, state=(), segment_ids=None, num_segments=1):
        """Returns `(m, new_state)`; `grad`, `w_tilde` and `m` are `(N, 1)`.

        An empty `state` stands for the zero initial state.
        """
        raise NotImplementedError

    def row_inputs(self, grad, w_tilde, segment_ids=None, num_segments=1):
        """Per-row inputs of `call_rows`: `(grad, w_tilde)` unless rows interact.

        Whatever couples rows (statistics over a kernel) is computed here; it
        must not depend on trainable weights, so that `call_rows` can be
        applied and differentiated in chunks of rows (`mq_keras.meta_apply`).
        """
        del segment_ids, num_segments
        return (grad, w_tilde)

    def call_rows(self, rows, state=()):
        """`(m, new_state)` from rows of `row_inputs` (each row on its own)."""
        grad, w_tilde = rows
        return self.call(grad, w_tilde, state)

    def compute_output_spec(self, *args, **kwargs):
        raise NotImplementedError("Meta networks are not used symbolically.")

    def get_config(self):
        config = super().get_config()
        config.update({"hidden_size": self.hidden_size, "seed": self.seed})
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FCGrad(MetaNetwork):
    """FC-Grad: two bias-free linear maps of the gradient alone.

    Forward: `m = (g @ W1) @ W2` with `W1: (1, H)`, `W2: (H, 1)`.
    Backward: ordinary autograd. Without bias or non-linearity this is one
    learned scalar `k = W1 @ W2`, `m = k * g`: a learned learning-rate
    multiplier (METAQUANT.md section 4).
    """

    name_key = "fc_grad"

    def build(self, input_shape=None):
        h = self.hidden_size
        self.w1 = self.add_weight(
            name="w1", shape=(1, h), initializer=_torch_linear_init(1, self.seed)
        )
        self.w2 = self.add_weight(
            name="w2",
            shape=(h, 1),
            initializer=_torch_linear_init(h, _seed(self.seed, 1)),
        )
        self.built = True

    def call(self, grad, w_tilde, state=(), segment_ids=None, num_segments=1):
        # Same function as (g @ W1) @ W2, without an (N, H) intermediate:
        # 0.5 ms instead of 6 ms per step for N = 35k on 2 CPU cores.
        return grad * ops.matmul(self.w1, self.w2), ()


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MultiFC(MetaNetwork):
    """MultiFC: `m = g * f(w_tilde)`, `f` a stack of bias-free linear layers.

    Forward: `f(x) = act(...act(x @ W0) @ W1 ...) @ W_{L-1}`, widths
    1 -> H -> ... -> H -> 1; `num_layers=3` and no activation reproduce the
    published runs (the paper text says 2 layers; the logs used 3).
    Backward: ordinary autograd.

    Args:
        num_layers: number of linear layers (>= 2).
        activation: optional activation between layers (reference: none).
    """

    name_key = "multifc"

    def __init__(self, *, num_layers=3, activation=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_layers, int) or num_layers < 2:
            raise ValueError(f"num_layers must be an int >= 2, got {num_layers!r}.")
        self.num_layers = num_layers
        try:
            self.activation = keras.activations.get(activation)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"Unknown activation={activation!r} for MultiFC: pass None (the "
                "reference), a name from keras.activations such as 'relu' or "
                "'tanh', or a callable."
            ) from e
        self._activation_config = activation

    def build(self, input_shape=None):
        h = self.hidden_size
        dims = [1] + [h] * (self.num_layers - 1) + [1]
        self.kernels = [
            self.add_weight(
                name=f"w{i}",
                shape=(dims[i], dims[i + 1]),
                initializer=_torch_linear_init(dims[i], _seed(self.seed, i)),
            )
            for i in range(self.num_layers)
        ]
        self.built = True

    def call(self, grad, w_tilde, state=(), segment_ids=None, num_segments=1):
        if self._activation_config is None:
            # Without activations the stack is one scalar K0 @ K1 @ ... ; form
            # it first (autograd still reaches every K_i) instead of pushing N
            # rows through H x H matmuls: ~30x less work per step.
            k = self.kernels[0]
            for kernel in self.kernels[1:]:
                k = ops.matmul(k, kernel)
            return grad * (w_tilde * k), ()
        x = w_tilde
        for i, k in enumerate(self.kernels):
            x = ops.matmul(x, k)
            if i < len(self.kernels) - 1:
                x = self.activation(x)
        return grad * x, ()

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_layers": self.num_layers,
                "activation": keras.activations.serialize(self.activation)
                if self._activation_config is not None
                else None,
            }
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LSTMFC(MetaNetwork):
    """LSTMFC: `m = g * (LSTM(w_tilde; h, c) @ w + b)`.

    Forward, per weight element, one LSTM step (gate order i, f, g, o as
    PyTorch and Keras)::

        z = x @ K + b_ih + h @ R + b_hh
        i, f, o = sigmoid(z_i), sigmoid(z_f), sigmoid(z_o);  u = tanh(z_g)
        c' = f * c + i * u;  h' = o * tanh(c');  m = g * (h' @ w + b)

    `(h', c')` is the new state, carried to the next step by `MetaQuantModel`
    (or reset every step, the paper-era behaviour). Two bias vectors, as in
    PyTorch, so that Adam moves them exactly as the reference did.
    Backward: ordinary autograd (state is an input, not differentiated).
    """

    name_key = "lstmfc"

    @property
    def state_size(self):
        return self.hidden_size

    def build(self, input_shape=None):
        h = self.hidden_size
        lstm_init = _torch_linear_init(h, self.seed)
        self.kernel = self.add_weight(
            name="kernel", shape=(1, 4 * h), initializer=lstm_init
        )
        self.recurrent_kernel = self.add_weight(
            name="recurrent_kernel",
            shape=(h, 4 * h),
            initializer=_torch_linear_init(h, _seed(self.seed, 1)),
        )
        self.bias_ih = self.add_weight(
            name="bias_ih",
            shape=(4 * h,),
            initializer=_torch_linear_init(h, _seed(self.seed, 2)),
        )
        self.bias_hh = self.add_weight(
            name="bias_hh",
            shape=(4 * h,),
            initializer=_torch_linear_init(h, _seed(self.seed, 3)),
        )
        self.fc_kernel = self.add_weight(
            name="fc_kernel",
            shape=(h, 1),
            initializer=_torch_linear_init(h, _seed(self.seed, 4)),
        )
        self.fc_bias = self.add_weight(
            name="fc_bias",
            shape=(1,),
            initializer=_torch_linear_init(h, _seed(self.seed, 5)),
        )
        self.built = True

    def initial_state(self, num_rows):
        zeros = ops.zeros((num_rows, self.hidden_size))
        return (zeros, zeros)

    def call(self, grad, w_tilde, state=(), segment_ids=None, num_segments=1):
        z = ops.matmul(w_tilde, self.kernel) + self.bias_ih
        if state:
            h_prev, c_prev = state
            z = z + ops.matmul(h_prev, self.recurrent_kernel)
        z = z + self.bias_hh
        zi, zf, zg, zo = ops.split(z, 4, axis=-1)
        c = ops.sigmoid(zi) * ops.tanh(zg)
        if state:
            # An empty state means zeros: skip the (N, H) x (H, 4H) product.
            c = ops.sigmoid(zf) * c_prev + c
        h = ops.sigmoid(zo) * ops.tanh(c)
        out = ops.matmul(h, self.fc_kernel) + self.fc_bias
        return grad * out, (h, c)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GainMLP(MetaNetwork):
    """Ours: a positive, scale-free, per-coordinate gain on the STE gradient.

    Forward::

        g_n = g / rms_k(g);   w_n = (w_tilde - mean_k(w_tilde)) / std_k(w_tilde)
        z = MLP([g_n, w_n])             (2 -> H -> H -> 1, tanh hidden units)
        m = g * max_gain ** tanh(z)

    where `rms_k`, `mean_k`, `std_k` are taken over the rows of the same
    kernel (`segment_ids`). Why this shape:

    * the gain is in (1/max_gain, max_gain), so `m` never flips the sign of a
      coordinate's STE gradient: the step stays a descent direction, unlike
      the reference networks, whose outputs can change sign;
    * inputs are normalised per kernel, so the function is invariant to the
      scale of the gradient (learning rate, loss scaling, batch size) and of
      the weights (DoReFa's [0, 1] vs BWN's raw W);
    * the last layer starts at zero, so z = 0 and the gain is exactly 1:
      training starts at the STE and learns departures from it, symmetric
      in log-scale (halving and doubling are equally far);
    * it is non-linear in both inputs, which FC-Grad and MultiFC are not.

    Backward: ordinary autograd.

    Args:
        hidden_size: hidden width (default 32).
        max_gain: the per-coordinate gain lies in (1/max_gain, max_gain)
            (default 4).
    """

    name_key = "gain_mlp"

    def __init__(self, *, hidden_size=32, max_gain=4.0, **kwargs):
        super().__init__(hidden_size=hidden_size, **kwargs)
        if (isinstance(max_gain, bool) or not isinstance(max_gain, numbers.Real)
                or not math.isfinite(max_gain) or not max_gain > 1.0):
            raise ValueError(
                f"max_gain must be a finite number > 1, got {max_gain!r}; "
                "e.g. max_gain=4.0 (the default)."
            )
        self.max_gain = float(max_gain)

    def build(self, input_shape=None):
        h = self.hidden_size
        glorot = keras.initializers.GlorotUniform
        self.w1 = self.add_weight(
            name="w1", shape=(2, h), initializer=glorot(seed=self.seed)
        )
        self.b1 = self.add_weight(name="b1", shape=(h,), initializer="zeros")
        self.w2 = self.add_weight(
            name="w2", shape=(h, h), initializer=glorot(seed=_seed(self.seed, 1))
        )
        self.b2 = self.add_weight(name="b2", shape=(h,), initializer="zeros")
        self.w3 = self.add_weight(name="w3", shape=(h, 1), initializer="zeros")
        self.b3 = self.add_weight(name="b3", shape=(1,), initializer="zeros")
        self.built = True

    def row_inputs(self, grad, w_tilde, segment_ids=None, num_segments=1):
        """`(g, g_n, w_n)`: the gradient and both inputs normalised per kernel."""
        count = _segment_sum_rows(ops.ones_like(grad), segment_ids, num_segments)

        def mean(x):
            return _segment_sum_rows(x, segment_ids, num_segments) / count

        g_n = grad / _safe_sqrt(mean(ops.square(grad)))
        w_c = w_tilde - mean(w_tilde)
        w_n = w_c / _safe_sqrt(mean(ops.square(w_c)))
        return (grad, g_n, w_n)

    def call(self, grad, w_tilde, state=(), segment_ids=None, num_segments=1):
        return self.call_rows(
            self.row_inputs(grad, w_tilde, segment_ids, num_segments), state
        )

    def call_rows(self, rows, state=()):
        grad, g_n, w_n = rows
        x = ops.concatenate([g_n, w_n], axis=-1)
        x = ops.tanh(ops.matmul(x, self.w1) + self.b1)
        x = ops.tanh(ops.matmul(x, self.w2) + self.b2)
        z = ops.matmul(x, self.w3) + self.b3
        gain = ops.exp(math.log(self.max_gain) * ops.tanh(z))  # exp(0) == 1
        return grad * gain, ()

    def get_config(self):
        config = super().get_config()
        config["max_gain"] = self.max_gain
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MetaEWGS(MetaNetwork):
    """Ours: EWGS with a meta-learned delta and shape per kernel, norm-preserving.

    Its inputs per weight are `g = dL/dW_hat` and the discretization
    residual `r = x - x_q` in the quantizer's own domain, in units of its
    level step (`Quantizer.residual`, in [-1/2, 1/2]; DoReFa with
    `n = 2^k - 1` levels: `r = n*W_tilde - round(n*W_tilde)`).
    `MetaQuantModel` passes `r` in place of `W_tilde` (`weight_input`).

    Forward, for the rows of kernel `l`::

        delta_l = tanh(a_l)    (delta_range="signed", the default)
        delta_l = sigmoid(a_l) (delta_range="nonnegative")
        gamma_l = tanh(b_l)
        f = 1 + delta_l * sign(g) * r + gamma_l * (2|r| - 1/2)
        m = g * f * ||g||_l / ||g * f||_l

    `||.||_l` is the L2 norm over the rows of kernel `l` (`segment_ids`).
    Why this shape:

    * `delta_l` is EWGS' delta (Lee, Kim & Ham, CVPR 2021) in level units
      (`mq_keras.gradients`: a DoReFa k-bit EWGS delta is `n * delta_l`),
      learned instead of set from the Hessian; signed, so that the
      meta-gradient can also say "the reverse of EWGS": > 0 favours weights
      whose descent step is far from the threshold that changes their code,
      < 0 weights about to change code;
    * `gamma_l` shapes the gain by the distance to the decision threshold:
      > 0 favours weights near a threshold (one step flips their code),
      < 0 weights sitting on their level; `2|r| - 1/2` has mean 0 for
      uniformly spread residuals;
    * `|delta_l| + |gamma_l| < 2`, so `f > 0`: `m` never flips the sign of a
      coordinate of the STE gradient;
    * NO learning-rate multiplier in disguise: the output is renormalised so
      that `||m||_l == ||g||_l` for every kernel; only the direction of the
      update within a kernel can change (the linear meta networks mostly
      learned a ~20x gain, which a tuned learning rate gives the STE too);
    * `m` is homogeneous of degree 1 in `g`, so the function is invariant to
      the gradient's scale (learning rate, loss scaling, batch size);
    * at the start `gamma_l = 0` and `delta_l = delta_init`: with the
      default 0, `f = 1` and `m = g`, exactly the STE; with EWGS' delta in
      level units (`delta / n` for DoReFa's `n = 2^k - 1` levels) and
      `delta_range="nonnegative"` it starts as EWGS (renormalised) and the
      look-ahead may only shrink or grow EWGS' damping, never reverse it.
      The one-step look-ahead alone drives a signed delta below 0 (it
      favours weights about to change code, a greedy choice for the next
      step); the constraint keeps the sign that EWGS' analysis gives.

    Backward: ordinary autograd through `tanh`, `f` and the renormalisation.
    Rows interact only through per-kernel moments of `g` that do not depend
    on the weights (`||g * f||_l^2` is a quadratic form in `(1, delta_l,
    gamma_l)`), so chunked application (`meta_chunk_size`) gives the same
    result.

    Args:
        num_kernels: number of kernels (one `(delta, gamma)` each); None:
            set by `MetaQuantModel` (`bind_kernels`).
        learn_shape: learn `gamma_l` (default); False keeps it 0.
        delta_init: every `delta_l` at the start; in (-1, 1) when signed,
            in (0, 1) when nonnegative.
        delta_range: "signed" (`tanh`) or "nonnegative" (`sigmoid`).
        **kwargs: `MetaNetwork` options (`hidden_size` is unused).
    """

    name_key = "meta_ewgs"
    weight_input = "residual"

    DELTA_RANGES = ("signed", "nonnegative")

    def __init__(self, *, num_kernels=None, learn_shape=True, delta_init=0.0,
                 delta_range="signed", **kwargs):
        super().__init__(**kwargs)
        if delta_range not in self.DELTA_RANGES:
            raise ValueError(
                f"delta_range must be one of {self.DELTA_RANGES}, got {delta_range!r}.")
        lo = 0.0 if delta_range == "nonnegative" else -1.0
        if (isinstance(delta_init, bool) or not isinstance(delta_init, numbers.Real)
                or not lo < float(delta_init) < 1.0):
            raise ValueError(
                f"delta_init must be a number in ({lo:g}, 1) for "
                f"delta_range={delta_range!r}, got {delta_init!r}; EWGS' delta "
                "in level units is delta / (2^k - 1) for k-bit DoReFa.")
        self.delta_init = float(delta_init)
        self.delta_range = delta_range
        if num_kernels is not None and (
                isinstance(num_kernels, bool) or not isinstance(num_kernels, numbers.Integral)
                or num_kernels < 1):
            raise ValueError(
                f"num_kernels must be a positive int or None, got {num_kernels!r}.")
        self.num_kernels = None if num_kernels is None else int(num_kernels)
        self.learn_shape = bool(learn_shape)

    def bind_kernels(self, quantizers):
        """Sizes the per-kernel weights; checks every quantizer has a residual."""
        bad = [q for q in quantizers if not q.defines_residual]
        if bad:
            raise ValueError(
                f"meta_network='meta_ewgs' needs each kernel's discretization "
                f"residual, which {bad[0]!r} does not define; use DoReFa, BWN "
                "or Uniform kernels.")
        if self.num_kernels is not None and self.num_kernels != len(quantizers):
            raise ValueError(
                f"This MetaEWGS has num_kernels={self.num_kernels} but the model "
                f"has {len(quantizers)} quantized kernels; use a new instance "
                "(or meta_network='meta_ewgs') per model.")
        self.num_kernels = len(quantizers)

    def build(self, input_shape=None):
        if self.num_kernels is None:
            raise ValueError(
                "MetaEWGS needs num_kernels before build: pass num_kernels= or let "
                "MetaQuantModel set it.")
        shape = (self.num_kernels,)
        d = self.delta_init
        # The logit whose tanh / sigmoid is delta_init.
        logit = math.atanh(d) if self.delta_range == "signed" else math.log(d / (1.0 - d))
        self.delta_logit = self.add_weight(name="delta_logit", shape=shape,
                                           initializer=keras.initializers.Constant(logit))
        self.gamma_logit = self.add_weight(name="gamma_logit", shape=shape,
                                           initializer="zeros",
                                           trainable=self.learn_shape)
        self.built = True

    def learned_parameters(self):
        """`{"delta": [...], "gamma": [...]}`, one value per kernel."""
        return {"delta": ops.convert_to_numpy(self._delta()).tolist(),
                "gamma": ops.convert_to_numpy(ops.tanh(self.gamma_logit)).tolist()}

    def _delta(self):
        if self.delta_range == "signed":
            return ops.tanh(self.delta_logit)
        return ops.sigmoid(self.delta_logit)

    def row_inputs(self, grad, w_tilde, segment_ids=None, num_segments=1):
        """`(g, phi_1, phi_2, kernel, moments)`: features and per-kernel moments.

        `phi_1 = sign(g) * r`, `phi_2 = 2|r| - 1/2`; `moments` holds, per row,
        its kernel's sums of `g^2 phi_i phi_j` (i <= j, `phi_0 = 1`), from
        which `||g * f||_l^2` follows for any delta and gamma.
        """
        r = w_tilde
        phi = [ops.ones_like(grad), ops.sign(grad) * r, 2.0 * ops.abs(r) - 0.5]
        g2 = ops.square(grad)
        pairs = ops.concatenate(
            [g2 * phi[i] * phi[j] for i in range(3) for j in range(i, 3)], axis=-1)
        moments = _segment_sum_rows(pairs, segment_ids, num_segments)
        kernel = (ops.zeros_like(grad, dtype="int32") if segment_ids is None
                  else ops.reshape(ops.cast(segment_ids, "int32"), (-1, 1)))
        return (grad, phi[1], phi[2], kernel, moments)

    def call(self, grad, w_tilde, state=(), segment_ids=None, num_segments=1):
        return self.call_rows(
            self.row_inputs(grad, w_tilde, segment_ids, num_segments), state)

    def call_rows(self, rows, state=()):
        grad, phi_1, phi_2, kernel, moments = rows
        delta = ops.take(self._delta(), kernel[:, 0])[:, None]
        gamma = ops.take(ops.tanh(self.gamma_logit), kernel[:, 0])[:, None]
        m00, m01, m02, m11, m12, m22 = ops.split(moments, 6, axis=-1)
        norm_f = (m00 + 2.0 * delta * m01 + 2.0 * gamma * m02 + delta * delta * m11
                  + 2.0 * delta * gamma * m12 + gamma * gamma * m22)
        f = 1.0 + delta * phi_1 + gamma * phi_2
        # ||g||_l / ||g f||_l; f > 0, so ||g f||_l = 0 only for a zero kernel.
        scale = _safe_sqrt(m00) / _safe_sqrt(ops.maximum(norm_f, 0.0))
        return grad * f * scale, ()

    def get_config(self):
        config = super().get_config()
        config.update({"num_kernels": self.num_kernels, "learn_shape": self.learn_shape,
                       "delta_init": self.delta_init, "delta_range": self.delta_range})
        return config


_REGISTRY = {cls.name_key: cls for cls in (FCGrad, MultiFC, LSTMFC, GainMLP, MetaEWGS)}


def class_for(name):
    """The MetaNetwork class registered under `name`, or None."""
    return _REGISTRY.get(name.lower()) if isinstance(name, str) else None


def _options_of(cls):
    """(options of `cls` and its MetaNetwork bases, options of keras Layer)."""
    own, layer = set(), set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        names = {p.name for p in inspect.signature(init).parameters.values()
                 if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
                 and p.name != "self"}
        if klass is keras.layers.Layer:
            layer |= names
            break
        own |= names
    return sorted(own), sorted(layer)


def check_options(cls, options, what, label="option(s)"):
    """Raises a ValueError naming the options of `cls` if `options` has others."""
    own, layer = _options_of(cls)
    unknown = sorted(set(options) - set(own) - set(layer))
    if unknown:
        raise ValueError(
            f"Unknown {label} {unknown} for {what}; {cls.__name__} takes "
            f"{own} (and keras.layers.Layer options such as name and dtype)."
        )


def get(identifier, **options):
    """Returns a meta network from a name, a config dict or an instance.

    Args:
        identifier: "fc_grad", "multifc", "lstmfc", "gain_mlp", "meta_ewgs", a
            `MetaNetwork`, or a serialized one.
        **options: constructor options (`hidden_size`, `seed`, ...).

    Raises:
        ValueError: unknown name.
    """
    if isinstance(identifier, MetaNetwork):
        return identifier
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    if isinstance(identifier, str) and identifier.lower() in _REGISTRY:
        cls = _REGISTRY[identifier.lower()]
        check_options(cls, options, f"meta network {identifier!r}")
        return cls(**options)
    raise ValueError(
        f"Unknown meta_network {identifier!r}; allowed names are "
        f"{sorted(_REGISTRY)} (or estimator='ste' for the plain STE)."
    )
