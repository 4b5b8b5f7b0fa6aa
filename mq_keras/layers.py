"""`MetaQuantWrapper`: quantize a layer's kernels, keep what the meta step needs.

The wrapper only knows "quantize my kernels with an STE backward and remember
dL/dW_hat and W_tilde". The meta network and the look-ahead live in
`MetaQuantModel.train_step`, which talks to the wrappers through a
`training_context`: it hands each wrapper the latent value to quantize (the
look-ahead `V` instead of the variable `W`) and collects `(W_tilde, W_hat)`
so it can ask the tape for `dL/dW_hat`. Outside that context (inference,
evaluation, export) a wrapper computes plain `Q(A(W))`.
"""

import contextlib
import threading

import keras
from keras import ops

from mq_keras import kernels, quantizers
from mq_keras.cloning import takes_argument

_PACKAGE = "mq_keras"

SUPPORTED_LAYERS = kernels.LEAF_TYPES

# MetaQuant state is computed from all-reduced gradients, so every replica
# writes the same value; under tf.distribute the first replica's write is kept
# (an assignment in replica context needs some aggregation to be allowed).
STATE_AGGREGATION = "only_first_replica"


def is_supported(layer):
    """True if `layer` is, or holds, a layer type with quantizable kernels."""
    return isinstance(layer, keras.layers.Layer) and kernels.has_kernels(layer)


class _TrainingContext:
    """What one training step tells the wrappers, and what they report back."""

    def __init__(self, latents):
        self._latents = latents  # id(variable) -> tensor to quantize instead
        self.records = {}  # id(kernel variable) -> (w_tilde, w_hat)

    def latent(self, variable):
        value = self._latents.get(id(variable))
        return ops.convert_to_tensor(variable) if value is None else value

    def override(self, variable):
        return self._latents.get(id(variable))


_LOCAL = threading.local()


def _current_context():
    stack = getattr(_LOCAL, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def training_context(latents):
    """Within this block, wrappers quantize `latents[id(var)]` instead of `var`.

    Args:
        latents: dict from `id(variable)` to the tensor to use in its place
            (kernels: the look-ahead value to quantize; biases: the value to
            use directly).

    Yields:
        The context; after the forward pass its `records` map `id(kernel)` to
        `(w_tilde, w_hat)` of that forward.
    """
    ctx = _TrainingContext(latents)
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    stack.append(ctx)
    try:
        yield ctx
    finally:
        stack.pop()


class KernelSlot:
    """One quantized kernel of a wrapper and its MetaQuant state variables.

    Attributes:
        variable: the latent float kernel `W` (trainable).
        channel_axes: output-channel axes of `W`.
        quantizer: the `Quantizer` of this kernel.
        key: its name within the wrapper (`kernel`, `query_kernel`, ...).
        prev_grad: `dL/dW_hat` of the last step.
        prev_w_tilde: `W_tilde` of the last step.
        prev_update: the update direction `r` applied last step
            (`W_before - W_after = lr * r`, stored divided by lr).
    """

    def __init__(self, variable, channel_axes, prev_grad, prev_w_tilde, prev_update,
                 *, quantizer=None, key="kernel"):
        self.variable = variable
        self.channel_axes = channel_axes
        self.prev_grad = prev_grad
        self.prev_w_tilde = prev_w_tilde
        self.prev_update = prev_update
        self.quantizer = quantizer
        self.key = key


class BiasSlot:
    """A float bias of a quantized layer and its last update direction `r_b`."""

    def __init__(self, variable, prev_update):
        self.variable = variable
        self.prev_update = prev_update


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MetaQuantWrapper(keras.layers.Wrapper):
    """Quantizes every kernel of a layer, nested layers included.

    Forward: the wrapped layer runs with each kernel `W` replaced by
    `W_hat = Q(A(W))` (its quantizer); biases, normalization and everything
    else stay float.

    Backward: `dL/dW = dL/dW_hat * dW_hat/dW` with the quantizer's STE.
    Under `MetaQuantModel` training, the gradient actually applied to `W` is
    `calib(W) * m` from the meta network instead (see `MetaQuantModel`).

    What is a kernel (`mq_keras.kernels`): the kernels of Dense, convolution,
    EinsumDense, Embedding and recurrent cells, found anywhere inside the
    wrapped layer, so one wrapper quantizes a `MultiHeadAttention` (its four
    projections), an `LSTM`/`GRU`/`SimpleRNN` (kernel and recurrent kernel),
    a `Bidirectional` or a user's subclassed block or model.

    State (non-trainable, per kernel): `<key>_prev_grad` (dL/dW_hat),
    `<key>_prev_w_tilde` (W_tilde) and `<key>_prev_update` (last update
    direction); `<bias>_prev_update` per bias of a leaf with kernels. They
    are saved with the model so training resumes where it stopped.

    Args:
        layer: a layer that is or holds one of `SUPPORTED_LAYERS`.
        kernel_quantizer: a quantizer name ("dorefa", "bwn", "ternary",
            "uniform") or instance, for every kernel.
        num_bits: bit width for a quantizer given by name.
        kernel_quantizers: optional `{kernel key: quantizer}` overriding
            `kernel_quantizer` for some kernels (keys as in `slots`, e.g.
            "kernel" or "query_kernel"); `None` leaves that kernel float.
        record_state: keep the MetaQuant state above (3 floats per weight);
            `quantize_model` sets it False for `estimator="ste"`, which needs
            none.
    """

    def __init__(self, layer, *, kernel_quantizer="dorefa", num_bits=None,
                 kernel_quantizers=None, record_state=True, **kwargs):
        if isinstance(layer, MetaQuantWrapper):
            raise ValueError(
                f"Layer {layer.name!r} is already a MetaQuantWrapper; wrap the "
                "float layer once."
            )
        if not is_supported(layer):
            raise ValueError(
                f"MetaQuantWrapper cannot quantize layer "
                f"{getattr(layer, 'name', layer)!r} of type "
                f"{type(layer).__name__}: it neither is nor holds a layer of "
                f"the supported types {sorted(c.__name__ for c in SUPPORTED_LAYERS)}."
            )
        kwargs.setdefault("name", f"quant_{layer.name}")
        kwargs.setdefault("dtype", layer.dtype_policy)
        super().__init__(layer, **kwargs)
        self.kernel_quantizer = quantizers.get(kernel_quantizer, num_bits=num_bits)
        # None: leave that kernel float.
        self.kernel_quantizers = {
            str(k): None if q is None else quantizers.get(q)
            for k, q in (kernel_quantizers or {}).items()
        }
        if not isinstance(record_state, bool):
            raise ValueError(f"record_state must be True or False, got {record_state!r}.")
        self.record_state = record_state
        self.supports_masking = getattr(layer, "supports_masking", False)
        self._call_takes_mask = takes_argument(layer.call, "mask")
        self.slots = []
        self.bias_slots = []
        self._own_bias = None

    # ------------------------------------------------------------------ build
    def build(self, input_shape=None):
        if not self.layer.built or not kernels.find_kernels(self.layer):
            if input_shape is None:
                raise ValueError(
                    f"MetaQuantWrapper {self.name!r}: the wrapped layer "
                    f"{self.layer.name!r} is not built and no input shape was "
                    "given; build the layer (or call the wrapper on data) first."
                )
            # Calling on a symbolic input builds any layer, including
            # subclassed blocks whose build() is Keras' default no-op.
            self.layer(keras.KerasTensor(input_shape, dtype=self.compute_dtype))
        self._make_slots()
        self.built = True

    def _state(self, key, suffix, shape):
        return self.add_weight(
            name=f"{key}_{suffix}", shape=shape, initializer="zeros",
            trainable=False, dtype="float32", aggregation=STATE_AGGREGATION,
        )

    def _make_slots(self):
        refs = kernels.find_kernels(self.layer)
        unknown = sorted(set(self.kernel_quantizers) - {r.key for r in refs})
        if unknown:
            raise ValueError(
                f"kernel_quantizers of {self.name!r} names kernels {unknown} "
                f"that {self.layer.name!r} does not have; its kernels are "
                f"{[r.key for r in refs]}."
            )
        keep = self.record_state
        self.slots = []
        owners = set()
        for ref in refs:
            if ref.key in self.kernel_quantizers and self.kernel_quantizers[ref.key] is None:
                continue
            owners.add(id(ref.owner))
            shape = ref.variable.shape
            self.slots.append(KernelSlot(
                ref.variable, ref.channel_axes,
                self._state(ref.key, "prev_grad", shape) if keep else None,
                self._state(ref.key, "prev_w_tilde", shape) if keep else None,
                self._state(ref.key, "prev_update", shape) if keep else None,
                quantizer=self.kernel_quantizers.get(ref.key, self.kernel_quantizer),
                key=ref.key,
            ))
        self.bias_slots = []
        self._own_bias = None
        for leaf, var in kernels.find_biases(self.layer):
            if id(leaf) not in owners:
                continue  # its kernels were left float
            # The layer's own bias keeps the key "bias" (and the state name
            # "bias_prev_update" of files saved before nested layers).
            key = "bias" if leaf is self.layer else f"{leaf.name}_bias"
            if leaf is self.layer:
                self._own_bias = var
            prev = self._state(key, "prev_update", var.shape) if keep else None
            self.bias_slots.append(BiasSlot(var, prev))

    def get_build_config(self):
        return {"layer": self.layer.get_build_config()}

    def build_from_config(self, config):
        config = config or {}
        if "input_shape" in config:  # files written by mq_keras <= 0.1
            self.build(config["input_shape"])
            return
        inner = config.get("layer")
        if inner and not self.layer.built:
            self.layer.build_from_config(inner)
        self.build(inner.get("input_shape") if inner else None)

    # ------------------------------------------------------------ accessors
    @property
    def kernel_variables(self):
        return [s.variable for s in self.slots]

    @property
    def bias_variable(self):
        """The wrapped layer's own `bias` (None if it has none or is composite)."""
        return self._own_bias

    @property
    def bias_prev_update(self):
        var = self.bias_variable
        return next((b.prev_update for b in self.bias_slots if b.variable is var), None)

    @property
    def state_variables(self):
        """The MetaQuant state this wrapper owns (not the wrapped layer's)."""
        out = []
        for s in self.slots:
            out += [v for v in (s.prev_grad, s.prev_w_tilde, s.prev_update) if v is not None]
        return out + [b.prev_update for b in self.bias_slots if b.prev_update is not None]

    @staticmethod
    def quantize_kernel(value, slot):
        """Returns `(W_tilde, W_hat)` for a latent kernel value of `slot`."""
        q = slot.quantizer
        value = ops.cast(value, "float32")
        w_tilde = q.pre_quantize(value, slot.channel_axes)
        return w_tilde, q.quantize(w_tilde, slot.channel_axes)

    def quantized_kernels(self):
        """Returns `{kernel key: Q(A(W))}` as NumPy arrays (for export and summary)."""
        out = {}
        for slot in self.slots:
            _, w_hat = self.quantize_kernel(ops.convert_to_tensor(slot.variable), slot)
            out[slot.key] = ops.convert_to_numpy(w_hat)
        return out

    def quantized_weights(self):
        """The wrapped layer's weights in order, kernels replaced by `Q(A(W))`."""
        by_id = {id(s.variable): s.key for s in self.slots}
        quantized = self.quantized_kernels()
        return [quantized[by_id[id(v)]] if id(v) in by_id else v.numpy()
                for v in self.layer.weights]

    # ------------------------------------------------------------------ call
    def _kernel_mapping(self, ctx):
        mapping = []
        for slot in self.slots:
            record = ctx.records.get(id(slot.variable)) if ctx is not None else None
            if record is None:
                latent = (ctx.latent(slot.variable) if ctx is not None
                          else ops.convert_to_tensor(slot.variable))
                record = self.quantize_kernel(latent, slot)
                if ctx is not None:
                    ctx.records[id(slot.variable)] = record
            # else: a shared layer called again in the same forward pass
            # reuses its W_hat, so the tape's dL/dW_hat sums over every call
            # (the meta network must see the kernel's whole gradient).
            mapping.append((slot.variable, ops.cast(record[1], slot.variable.dtype)))
        if ctx is not None:
            for b in self.bias_slots:
                value = ctx.override(b.variable)
                if value is not None:
                    mapping.append((b.variable, value))
        return mapping

    def call(self, inputs, *args, training=None, mask=None, **kwargs):
        mapping = self._kernel_mapping(_current_context())
        if mask is not None and self._call_takes_mask:
            kwargs["mask"] = mask
        # The layer's own call reads its kernels, which inside this scope are
        # W_hat. Anything else it writes (BatchNormalization statistics, the
        # seed of a dropout) is collected by the scope and written back below:
        # only the kernels are stand-ins.
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            outputs = self.layer(inputs, *args, training=training, **kwargs)
        mapped = {id(v) for v, _ in mapping}
        for v in self.layer.variables:
            if id(v) not in mapped:
                new = scope.get_current_value(v)
                if new is not None:
                    v.assign(new)
        for loss in scope.losses:
            self.add_loss(loss)
        return outputs

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)

    def compute_output_shape(self, *args, **kwargs):
        return self.layer.compute_output_shape(*args, **kwargs)

    def compute_output_spec(self, *args, **kwargs):
        kwargs.pop("training", None)
        if not self._call_takes_mask:
            kwargs.pop("mask", None)
        return self.layer.compute_output_spec(*args, **kwargs)

    # ----------------------------------------------------------- serialization
    def get_config(self):
        config = super().get_config()
        config["kernel_quantizer"] = quantizers.serialize(self.kernel_quantizer)
        if self.kernel_quantizers:
            config["kernel_quantizers"] = {
                k: None if q is None else quantizers.serialize(q)
                for k, q in self.kernel_quantizers.items()}
        config["record_state"] = self.record_state
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(
            config.pop("layer"), custom_objects=custom_objects
        )

        def load(c):
            if c is None:
                return None
            return keras.saving.deserialize_keras_object(c, custom_objects=custom_objects)

        quantizer = load(config.pop("kernel_quantizer"))
        per_kernel = {k: load(c) for k, c in config.pop("kernel_quantizers", {}).items()}
        return cls(layer, kernel_quantizer=quantizer, kernel_quantizers=per_kernel or None,
                   **config)
