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

from mq_keras import quantizers

_PACKAGE = "mq_keras"

# Layer type -> ((kernel variable name, output-channel axes of that kernel), ...)
# Output channels: Dense/Conv kernels end in (..., in, out); transposed convs in
# (..., out, in); depthwise kernels in (..., in, multiplier), whose output
# channel is the (in, multiplier) pair.
_KERNELS = {
    keras.layers.Dense: (("kernel", (-1,)),),
    keras.layers.Conv1D: (("kernel", (-1,)),),
    keras.layers.Conv2D: (("kernel", (-1,)),),
    keras.layers.Conv3D: (("kernel", (-1,)),),
    keras.layers.Conv1DTranspose: (("kernel", (-2,)),),
    keras.layers.Conv2DTranspose: (("kernel", (-2,)),),
    keras.layers.Conv3DTranspose: (("kernel", (-2,)),),
    keras.layers.DepthwiseConv1D: (("kernel", (-2, -1)),),
    keras.layers.DepthwiseConv2D: (("kernel", (-2, -1)),),
    keras.layers.SeparableConv1D: (
        ("depthwise_kernel", (-2, -1)),
        ("pointwise_kernel", (-1,)),
    ),
    keras.layers.SeparableConv2D: (
        ("depthwise_kernel", (-2, -1)),
        ("pointwise_kernel", (-1,)),
    ),
}

SUPPORTED_LAYERS = tuple(_KERNELS)

# MetaQuant state is computed from all-reduced gradients, so every replica
# writes the same value; under tf.distribute the first replica's write is kept
# (an assignment in replica context needs some aggregation to be allowed).
STATE_AGGREGATION = "only_first_replica"


def kernel_spec(layer):
    """Returns `((kernel_name, channel_axes), ...)` for a supported layer, else None.

    The exact type wins; a subclass of a supported type takes its base's spec.
    """
    spec = _KERNELS.get(type(layer))
    if spec is not None:
        return spec
    for cls, spec in _KERNELS.items():
        if isinstance(layer, cls):
            return spec
    return None


def is_supported(layer):
    return kernel_spec(layer) is not None


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
        prev_grad: `dL/dW_hat` of the last step.
        prev_w_tilde: `W_tilde` of the last step.
        prev_update: the update direction `r` applied last step
            (`W_before - W_after = lr * r`, stored divided by lr).
    """

    def __init__(self, variable, channel_axes, prev_grad, prev_w_tilde, prev_update):
        self.variable = variable
        self.channel_axes = channel_axes
        self.prev_grad = prev_grad
        self.prev_w_tilde = prev_w_tilde
        self.prev_update = prev_update


def _find_variable(layer, name):
    for v in layer.weights:
        if v.name == name:
            return v
    return None


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MetaQuantWrapper(keras.layers.Wrapper):
    """Quantizes the kernel(s) of a Dense or convolution layer.

    Forward: the wrapped layer runs with each kernel replaced by
    `W_hat = Q(A(W))` (`kernel_quantizer`); the bias stays float.

    Backward: `dL/dW = dL/dW_hat * dW_hat/dW` with the quantizer's STE.
    Under `MetaQuantModel` training, the gradient actually applied to `W` is
    `calib(W) * m` from the meta network instead (see `MetaQuantModel`).

    State (non-trainable, per kernel): `<kernel>_prev_grad` (dL/dW_hat),
    `<kernel>_prev_w_tilde` (W_tilde) and `<kernel>_prev_update` (last update
    direction); `bias_prev_update` when the layer has a bias. They are saved
    with the model so training resumes where it stopped.

    Args:
        layer: a `Dense`, `Conv1D/2D/3D`, `Conv1D/2D/3DTranspose`,
            `DepthwiseConv1D/2D` or `SeparableConv1D/2D` layer.
        kernel_quantizer: a quantizer name ("dorefa", "bwn", "ternary",
            "uniform") or instance.
        num_bits: bit width for a quantizer given by name.
        record_state: keep the MetaQuant state above (3 floats per weight);
            `quantize_model` sets it False for `estimator="ste"`, which needs
            none.
    """

    def __init__(self, layer, *, kernel_quantizer="dorefa", num_bits=None,
                 record_state=True, **kwargs):
        if isinstance(layer, MetaQuantWrapper):
            raise ValueError(
                f"Layer {layer.name!r} is already a MetaQuantWrapper; wrap the "
                "float layer once."
            )
        if not isinstance(layer, keras.layers.Layer) or not is_supported(layer):
            raise ValueError(
                f"MetaQuantWrapper cannot quantize layer "
                f"{getattr(layer, 'name', layer)!r} of type "
                f"{type(layer).__name__}; supported types are "
                f"{sorted(c.__name__ for c in SUPPORTED_LAYERS)}."
            )
        kwargs.setdefault("name", f"quant_{layer.name}")
        kwargs.setdefault("dtype", layer.dtype_policy)
        super().__init__(layer, **kwargs)
        self.kernel_quantizer = quantizers.get(kernel_quantizer, num_bits=num_bits)
        if not isinstance(record_state, bool):
            raise ValueError(f"record_state must be True or False, got {record_state!r}.")
        self.record_state = record_state
        self._spec = kernel_spec(layer)
        self.slots = []
        self.bias_variable = None
        self.bias_prev_update = None

    def build(self, input_shape=None):
        super().build(input_shape)
        self.slots = []
        for name, axes in self._spec:
            var = _find_variable(self.layer, name)
            if var is None:
                raise ValueError(
                    f"Layer {self.layer.name!r} has no variable {name!r} after build."
                )

            def state(suffix, var=var, name=name):
                if not self.record_state:
                    return None
                return self.add_weight(
                    name=f"{name}_{suffix}",
                    shape=var.shape,
                    initializer="zeros",
                    trainable=False,
                    dtype="float32",
                    aggregation=STATE_AGGREGATION,
                )

            self.slots.append(
                KernelSlot(
                    var, axes, state("prev_grad"), state("prev_w_tilde"),
                    state("prev_update"),
                )
            )
        self.bias_variable = _find_variable(self.layer, "bias")
        if self.bias_variable is not None and self.record_state:
            self.bias_prev_update = self.add_weight(
                name="bias_prev_update",
                shape=self.bias_variable.shape,
                initializer="zeros",
                trainable=False,
                dtype="float32",
                aggregation=STATE_AGGREGATION,
            )
        self.built = True

    @property
    def kernel_variables(self):
        return [s.variable for s in self.slots]

    def quantize_kernel(self, value, slot):
        """Returns `(W_tilde, W_hat)` for a latent kernel value of `slot`."""
        q = self.kernel_quantizer
        value = ops.cast(value, "float32")
        w_tilde = q.pre_quantize(value, slot.channel_axes)
        return w_tilde, q.quantize(w_tilde, slot.channel_axes)

    def quantized_kernels(self):
        """Returns `{kernel_name: Q(A(W))}` as NumPy arrays (for export and summary)."""
        out = {}
        for slot in self.slots:
            _, w_hat = self.quantize_kernel(ops.convert_to_tensor(slot.variable), slot)
            out[slot.variable.name] = ops.convert_to_numpy(w_hat)
        return out

    def call(self, inputs, training=None):
        ctx = _current_context()
        mapping = []
        for slot in self.slots:
            latent = (
                ctx.latent(slot.variable)
                if ctx is not None
                else ops.convert_to_tensor(slot.variable)
            )
            record = ctx.records.get(id(slot.variable)) if ctx is not None else None
            if record is None:
                w_tilde, w_hat = self.quantize_kernel(latent, slot)
                if ctx is not None:
                    ctx.records[id(slot.variable)] = (w_tilde, w_hat)
            else:
                # A shared layer called again in the same forward pass reuses
                # its W_hat, so the tape's dL/dW_hat sums over every call
                # (the meta network must see the kernel's whole gradient).
                w_tilde, w_hat = record
            mapping.append((slot.variable, ops.cast(w_hat, slot.variable.dtype)))
        if ctx is not None and self.bias_variable is not None:
            b = ctx.override(self.bias_variable)
            if b is not None:
                mapping.append((self.bias_variable, b))
        # The layer's own call reads `kernel`, which inside this scope is W_hat.
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            outputs = self.layer(inputs, training=training)
        for loss in scope.losses:
            self.add_loss(loss)
        return outputs

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def compute_output_spec(self, inputs, training=None):
        return self.layer.compute_output_spec(inputs)

    def get_config(self):
        config = super().get_config()
        config["kernel_quantizer"] = quantizers.serialize(self.kernel_quantizer)
        config["record_state"] = self.record_state
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(
            config.pop("layer"), custom_objects=custom_objects
        )
        quantizer = keras.saving.deserialize_keras_object(
            config.pop("kernel_quantizer"), custom_objects=custom_objects
        )
        return cls(layer, kernel_quantizer=quantizer, **config)
