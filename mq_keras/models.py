"""`MetaQuantModel`: trains a wrapped model with MetaQuant's meta-learned gradient.

The model is the Keras side of training: arguments, `compile` (a base and a
meta optimizer), serialization, metrics, and a `train_step` that hands each
batch to the step of its estimator and semantics:

* `mq_keras.step_code.code_step`: `semantics="code"` (default), the official
  code's step that produced the published tables (METAQUANT.md section 2);
* `mq_keras.step_paper.paper_step`: `semantics="paper"`, the paper's Eq. 6
  and 8;
* `mq_keras.step_ste.ste_step`: `estimator="ste"`, the plain
  straight-through estimator through the same wrappers.

What the steps share (the kernels as one column for the meta network, the
look-ahead forward, the guard that skips a non-finite step, the logs) is in
`mq_keras.step_common`. Every step is guarded: if the loss, a gradient, `m`
or the new meta state is not finite, nothing is written and `skipped_steps`
counts it. Under tf.distribute the stored state is built from all-reduced
gradients so every replica keeps the same (`mq_keras.distribute`); under
`mixed_float16` the loss scaling of a LossScaleOptimizer is applied by hand
(`mq_keras.loss_scaling`); `meta_chunk_size` bounds the meta network's memory
(`mq_keras.meta_apply`).
"""

import functools

import keras

from mq_keras import distribute, meta_networks
from mq_keras.layers import MetaQuantWrapper
from mq_keras.loss_scaling import LossScaling
from mq_keras.step_code import code_step
from mq_keras.step_common import KernelSlots, StepContext
from mq_keras.step_paper import paper_step
from mq_keras.step_ste import ste_step

_PACKAGE = "mq_keras"
ESTIMATORS = ("metaquant", "ste")
SEMANTICS = ("code", "paper")


def iter_layers(model):
    """Yields every layer of a Functional/Sequential model, nested models included."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model) or hasattr(layer, "layers"):
            sub = getattr(layer, "layers", None)
            if sub:
                yield from iter_layers(layer)


def wrappers_of(model):
    return [l for l in iter_layers(model) if isinstance(l, MetaQuantWrapper)]


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MetaQuantModel(keras.Model):
    """A quantized model trained with MetaQuant (or the plain STE).

    Build it with `mq_keras.quantize_model`. It behaves as a Keras model:
    `compile`, `fit`, `evaluate`, `predict`, `save`. Inference computes
    `f(x; Q(A(W)))` with BatchNormalization in inference mode; the meta
    network is used only by `train_step`.

    Args:
        model: a built Functional or Sequential model containing
            `MetaQuantWrapper` layers.
        meta_network: a meta network name or instance (ignored for "ste").
        estimator: "metaquant" (default) or "ste".
        semantics: "code" (default, the official code's step) or "paper".
        reset_meta_state: for recurrent meta networks (LSTMFC), start every
            step from a zero state (the paper-era code) instead of carrying
            (h, c) across steps (the code at HEAD).
        meta_chunk_size: apply the meta network to this many weights at a
            time (`mq_keras.meta_apply`): the meta step's extra memory drops
            from ~16 * N * hidden floats to O(meta_chunk_size * hidden), for
            ~3x the meta network's compute. None (default): all at once.
    """

    def __init__(self, model, meta_network="multifc", *, estimator="metaquant",
                 semantics="code", reset_meta_state=False, meta_chunk_size=None,
                 **kwargs):
        if not isinstance(model, keras.Model):
            raise ValueError(
                f"MetaQuantModel expects a built Functional or Sequential "
                f"keras.Model containing MetaQuantWrapper layers, got "
                f"{type(model).__name__}; build one with "
                "mq_keras.quantize_model(float_model)."
            )
        kwargs.setdefault("name", f"metaquant_{model.name}")
        super().__init__(**kwargs)
        if estimator not in ESTIMATORS:
            raise ValueError(
                f"Unknown estimator {estimator!r}; allowed values are {ESTIMATORS}."
            )
        if semantics not in SEMANTICS:
            raise ValueError(
                f"Unknown semantics {semantics!r}; allowed values are {SEMANTICS}."
            )
        if not model.built:
            raise ValueError(
                f"Model {model.name!r} is not built; call it on data or give it "
                "an Input first."
            )
        self.quantized_model = model
        self.estimator = estimator
        self.semantics = semantics
        self.reset_meta_state = bool(reset_meta_state)
        if meta_chunk_size is not None and (
                isinstance(meta_chunk_size, bool) or not isinstance(meta_chunk_size, int)
                or meta_chunk_size < 1):
            raise ValueError(
                f"meta_chunk_size must be a positive int or None, got "
                f"{meta_chunk_size!r}; e.g. meta_chunk_size=262144."
            )
        self.meta_chunk_size = meta_chunk_size
        self.wrappers = wrappers_of(model)
        if not self.wrappers:
            raise ValueError(
                f"Model {model.name!r} has no MetaQuantWrapper layer: nothing to "
                "quantize. Use mq_keras.quantize_model on a model with Dense or "
                "convolution layers."
            )
        stateless = [w.name for w in self.wrappers if not w.record_state]
        if estimator == "metaquant" and stateless:
            raise ValueError(
                f"Wrappers {stateless} were built with record_state=False (for "
                "the STE), but estimator='metaquant' needs their state; "
                "quantize the float model again with "
                "mq_keras.quantize_model(..., estimator='metaquant')."
            )
        # The kernels as the meta network sees them (`mq_keras.step_common`);
        # `_slots`, their (wrapper, slot) pairs, is read by the benchmarks.
        self._kernels = KernelSlots(self.wrappers)
        self._slots = self._kernels.slots
        self.meta_step = self.add_weight(
            name="meta_step", shape=(), dtype="int64", initializer="zeros",
            trainable=False,
        )
        # Steps whose loss, gradients or meta output were not finite; such a
        # step writes nothing (weights, optimizer and MetaQuant state).
        self.skipped_steps = self.add_weight(
            name="skipped_steps", shape=(), dtype="int64", initializer="zeros",
            trainable=False,
        )
        self.meta_network = None
        self.meta_state = []
        if estimator == "metaquant":
            self.meta_network = meta_networks.get(meta_network)
            self.meta_network.bind_kernels(
                [s.quantizer for _, s in self._kernels.slots])
            if not self.meta_network.built:
                self.meta_network.build()

            size = self.meta_network.state_size
            if size:
                self.meta_state = [
                    self.add_weight(
                        name=f"meta_state_{k}", shape=(self._kernels.num_weights, size),
                        initializer="zeros", trainable=False, dtype="float32",
                    )
                    for k in ("h", "c")
                ]
            self.meta_loss_tracker = keras.metrics.Mean(name="meta_loss")
            self.grad_ratio_tracker = keras.metrics.Mean(name="meta_grad_ratio")
        self.meta_optimizer = None
        self._rest_optimizer = None
        self.built = True

    # ------------------------------------------------------------------ Keras API
    def call(self, inputs, training=None):
        return self.quantized_model(inputs, training=training)

    @property
    def metrics(self):
        metrics = super().metrics
        if self.estimator == "metaquant":
            metrics = metrics + [self.meta_loss_tracker, self.grad_ratio_tracker]
        return metrics

    @property
    def base_variables(self):
        """Trainable variables of the quantized model (what `optimizer` updates)."""
        return self.quantized_model.trainable_variables

    def compile(self, optimizer="rmsprop", *, meta_optimizer=None, **kwargs):
        """Configures training. As `keras.Model.compile`, plus:

        Args:
            optimizer: the base optimizer (updates weights, biases, BN).
            meta_optimizer: optimizer of the meta network; required for the
                "metaquant" estimator. The reference used Adam(1e-3) in the
                form of `mq_keras.PaperAdam`.
            **kwargs: passed to `keras.Model.compile`.
        """
        if self.estimator == "ste" and meta_optimizer is not None:
            raise ValueError(
                "meta_optimizer is only used by estimator='metaquant', not "
                "estimator='ste' (which has no meta network); drop "
                "meta_optimizer."
            )
        if meta_optimizer is not None and meta_optimizer is optimizer:
            raise ValueError(
                "optimizer and meta_optimizer must be two different optimizer "
                "instances (each keeps slots for its own variables); pass e.g. "
                "meta_optimizer=mq_keras.PaperAdam(1e-3)."
            )
        if self.estimator == "metaquant" and meta_optimizer is None:
            raise ValueError(
                "MetaQuantModel.compile() needs meta_optimizer= for the "
                "'metaquant' estimator, e.g. meta_optimizer="
                "mq_keras.PaperAdam(1e-3) (the reference's) or "
                "keras.optimizers.Adam(1e-3)."
            )
        if meta_optimizer is not None:
            try:
                meta_optimizer = keras.optimizers.get(meta_optimizer)
            except ValueError as e:
                raise ValueError(
                    f"Unknown meta_optimizer={meta_optimizer!r}: {e}. Pass an "
                    "optimizer instance such as mq_keras.PaperAdam(1e-3) or a "
                    "Keras optimizer name ('adam')."
                ) from e
        super().compile(optimizer=optimizer, **kwargs)
        # Build the base optimizer on the base variables only, so that the
        # meta network never gets base-optimizer slots.
        self.optimizer.build(self.base_variables)
        if self.estimator == "metaquant":
            self.meta_optimizer = meta_optimizer
            self.meta_optimizer.build(self.meta_network.trainable_variables)
            if self.semantics == "paper":
                _, rest, _ = self._kernels.partition(self.base_variables)
                base = LossScaling(self.optimizer).optimizer
                self._rest_optimizer = type(base).from_config(base.get_config())
                self._rest_optimizer.build(rest)

    def get_compile_config(self):
        config = super().get_compile_config()
        if config is not None and self.meta_optimizer is not None:
            config["meta_optimizer"] = keras.saving.serialize_keras_object(
                self.meta_optimizer
            )
        return config

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)

    def get_config(self):
        return {
            "name": self.name,
            "model": keras.saving.serialize_keras_object(self.quantized_model),
            "meta_network": keras.saving.serialize_keras_object(self.meta_network)
            if self.meta_network is not None else None,
            "estimator": self.estimator,
            "semantics": self.semantics,
            "reset_meta_state": self.reset_meta_state,
            "meta_chunk_size": self.meta_chunk_size,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects
        )
        meta = config.pop("meta_network")
        if meta is not None:
            meta = keras.saving.deserialize_keras_object(
                meta, custom_objects=custom_objects
            )
        return cls(model, meta, **config)

    def test_step(self, data):
        logs = super().test_step(data)
        # The meta trackers only mean something in training.
        return distribute.as_multi_worker_logs(
            {k: v for k, v in logs.items()
             if k not in ("meta_loss", "meta_grad_ratio", "skipped_steps")}
        )

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self.estimator == "ste":
            step = ste_step
        elif self.semantics == "paper":
            step = paper_step
        else:
            step = code_step
        ctx = StepContext(
            self, kernels=self._kernels,
            compute_loss=functools.partial(self._compute_loss, training=True),
            loss_tracker=self._loss_tracker, rest_optimizer=self._rest_optimizer,
        )
        return distribute.as_multi_worker_logs(step(ctx, x, y, sample_weight))

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3.15 averages the first distributed batch with
        # strategy.reduce() to build metrics, which fails eagerly under
        # MultiWorkerMirroredStrategy (a plain keras.Model fails the same
        # way); shapes are all it needs, so take the first local replica's.
        if iterator is None or not distribute.is_multi_worker(self.distribute_strategy):
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        for _, _, it in iterator:
            data_batch = distribute.first_local_values(self.distribute_strategy, next(it))
            break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)
