"""`MetaQuantModel`: trains a wrapped model with MetaQuant's meta-learned gradient.

One training step under `semantics="code"` (METAQUANT.md section 2; the
semantics of the official code that produced the published tables), for each
quantized kernel `W` with state `g' = dL/dW_hat`, `w' = W_tilde` and `r'`
(last update direction) from the previous step, and `lr` the base optimizer's
*current* learning rate::

    m = M_phi(g', w')                          (one call for all kernels)
    u = calib(W) * m
    V = W - lr * (u + stop_gradient(r' - u))   (numerically W - lr * r')
    b_V = b - lr * stop_gradient(r'_b)         (biases of quantized layers)
    L = loss(f(x; Q(A(V)), b_V))
    phi <- meta_optimizer(dL/dphi)             (dL/dphi flows V -> u -> m -> phi)
    W   <- optimizer(calib(W) * stop_gradient(m))   every other variable: autograd
    r = (W_before - W_after) / lr;  g' = dL/dW_hat;  w' = A(V)

The first step only records `g'`, `w'` and `r' = dL/dV` (the raw STE gradient)
and updates nothing, as the reference does; both optimizers' counters therefore
start at the second step.

`semantics="paper"` (Eq. 6 and 8 of the paper) evaluates the look-ahead at this
step's real update instead: the kernels are updated first with
`calib(W) * M_phi(g', w')`, the loss is taken at the new kernels, and the meta
gradient uses the meta network's own output as `dL/dW_tilde` instead of the STE::

    dL/dphi = sum(calib(V) * M_phi(dL/dW_hat, W_tilde) * dV/dphi)

Biases and other variables are then updated with their ordinary gradients (by
a twin of the base optimizer, so that each optimizer counts one step per step).

`estimator="ste"` trains the same wrappers with the plain straight-through
estimator (Keras' ordinary train step), for like-for-like comparisons.

Every step is guarded: if the loss, a gradient, `m` or the new meta state is
not finite, nothing is written and `skipped_steps` counts it. Under
tf.distribute the stored state is built from all-reduced gradients so every
replica keeps the same (`mq_keras.distribute`); under `mixed_float16` the
loss scaling of a LossScaleOptimizer is applied by hand
(`mq_keras.loss_scaling`); `meta_chunk_size` bounds the meta network's memory
(`mq_keras.meta_apply`).
"""

import functools

import numpy as np
import keras
import tensorflow as tf
from keras import ops

from mq_keras import distribute, meta_networks
from mq_keras.loss_scaling import LossScaling
from mq_keras.meta_apply import MetaApplication
from mq_keras.layers import MetaQuantWrapper, training_context

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


def _global_norm(tensors):
    return ops.sqrt(sum(ops.sum(ops.square(t)) for t in tensors))


def _safe_divide(x, lr):
    # lr = 0 means no step was taken; keep r = 0 rather than 0/0.
    return ops.where(lr > 0, x / ops.where(lr > 0, lr, 1.0), ops.zeros_like(x))


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
        self._slots = [(w, s) for w in self.wrappers for s in w.slots]
        self._sizes = [int(np.prod(s.variable.shape)) for _, s in self._slots]
        self._segment_ids = np.repeat(
            np.arange(len(self._sizes), dtype="int32"), self._sizes
        )
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
            if not self.meta_network.built:
                self.meta_network.build()

            size = self.meta_network.state_size
            if size:
                self.meta_state = [
                    self.add_weight(
                        name=f"meta_state_{k}", shape=(sum(self._sizes), size),
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
                _, rest, _ = self._partition()
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

    # ------------------------------------------------------------- meta step
    def _flat(self, tensors):
        return ops.concatenate([ops.reshape(t, (-1, 1)) for t in tensors], axis=0)

    def _split(self, flat):
        """(N, 1) over all kernels -> one tensor shaped like each kernel."""
        parts = tf.split(flat, self._sizes, axis=0)
        return [ops.reshape(p, s.variable.shape) for p, (_, s) in zip(parts, self._slots)]

    @property
    def _carries_state(self):
        return bool(self.meta_state) and not self.reset_meta_state

    def _meta_application(self, grads=None, w_tildes=None, fresh=False):
        """The meta network applied to all kernels (`mq_keras.meta_apply`).

        Defaults to the stored (dL/dW_hat, W_tilde) of the last step and the
        carried state; `fresh=True` uses the zero state.
        """
        if grads is None:
            grads = [s.prev_grad for _, s in self._slots]
            w_tildes = [s.prev_w_tilde for _, s in self._slots]
        state = self.meta_state if (self._carries_state and not fresh) else ()
        return MetaApplication(
            self.meta_network, self._flat(grads), self._flat(w_tildes), state,
            chunk_size=self.meta_chunk_size,
            segment_ids=ops.convert_to_tensor(self._segment_ids),
            num_segments=len(self._sizes),
        )

    def _cotangent(self, active, per_kernel):
        """(N, 1) cotangent of m: `per_kernel[j]` for active slot j, else 0."""
        full = [ops.zeros_like(s.variable) for _, s in self._slots]
        for i, c in zip(active, per_kernel):
            full[i] = c
        return self._flat(full)

    def _partition(self):
        """Splits what this step trains: active kernel slots, others, biases.

        A slot whose kernel is not trainable (a frozen layer) keeps V = W and
        is neither updated nor given a look-ahead; `trainable` is read when the
        step is traced, as Keras does (recompile after changing it).
        """
        base = self.base_variables
        base_ids = {id(v) for v in base}
        active = [i for i, (_, s) in enumerate(self._slots)
                  if id(s.variable) in base_ids]
        kernel_ids = {id(self._slots[i][1].variable) for i in active}
        others = [v for v in base if id(v) not in kernel_ids]
        # Every float bias of a leaf with quantized kernels (a Dense's own, an
        # attention projection's, a recurrent cell's).
        bias_slots = [b for w in self.wrappers for b in w.bias_slots
                      if b.prev_update is not None and id(b.variable) in base_ids]
        return active, others, bias_slots

    def _forward_loss(self, x, y, sample_weight, latents):
        with training_context(latents) as ctx:
            y_pred = self(x, training=True)
        loss = self._compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        return y_pred, loss, ctx.records

    def _regularization_grads(self, kernels):
        """Gradient of each kernel's own regularizer (not seen through V)."""
        grads = []
        for v in kernels:
            reg = getattr(v, "regularizer", None)
            if reg is None:
                grads.append(None)
                continue
            with tf.GradientTape() as tape:
                r = reg(v)
            grads.append(tape.gradient(r, v))
        return grads

    def _look_ahead_grads(self, tape, scaled_loss, scaling, records, looks, others):
        """Gradients of the look-ahead forward (both semantics).

        Returns `(w_tildes, g_what, g_look, g_other)`: W_tilde of every slot;
        dL/dW_hat of every slot and dL/dV of every look-ahead, summed over
        replicas (in one all-reduce) as they become MetaQuant state; and the
        per-replica gradients of the other variables (None where unused).
        """
        w_tildes = [records[id(s.variable)][0] for _, s in self._slots]
        w_hats = [records[id(s.variable)][1] for _, s in self._slots]
        grads = scaling.unscale(tape.gradient(scaled_loss, w_hats + looks + others))
        n_s, n_k = len(w_hats), len(looks)
        reduced = distribute.all_reduce_sum(
            [ops.zeros_like(t) if g is None else g
             for g, t in zip(grads[:n_s + n_k], w_hats + looks)]
        )
        return w_tildes, reduced[:n_s], reduced[n_s:], grads[n_s + n_k:]

    @staticmethod
    def _all_finite(tensors):
        checks = [ops.all(ops.isfinite(t)) for t in tensors if t is not None]
        return functools.reduce(ops.logical_and, checks, ops.convert_to_tensor(True))

    def _record_state(self, g_what, w_tildes):
        """Stores this step's dL/dW_hat and W_tilde for the next meta step."""
        for (_, s), g, wt in zip(self._slots, g_what, w_tildes):
            s.prev_grad.assign(g)
            s.prev_w_tilde.assign(ops.cast(wt, "float32"))
        self.meta_step.assign_add(1)

    def _forward_state(self):
        """Copies of the variables a training forward pass writes (BN statistics).

        MetaQuant's own state is written only after the step is known to be
        finite, so it is left out (it is large: three floats per weight).
        """
        own = {id(v) for w in self.wrappers for v in w.state_variables}
        variables = [v for v in self.quantized_model.non_trainable_variables
                     if id(v) not in own]
        return variables, [ops.convert_to_tensor(v) + 0 for v in variables]

    def _guarded(self, finite, step, args, saved):
        """Runs `step(*args)` if `finite`; else restores `saved` and counts a skip.

        `finite` must agree on all replicas; `args` carries every per-replica
        tensor `step` needs (see `mq_keras.distribute.cond`).
        """
        variables, values = saved
        scaling = LossScaling(self.optimizer)

        def run(args, values):
            del values
            step(*args)
            scaling.on_finite()

        def skip(args, values):
            del args
            # The forward already moved BN's statistics towards NaN: undo it.
            for v, value in zip(variables, values):
                v.assign(value)
            self.skipped_steps.assign_add(1)
            scaling.on_skip()

        distribute.cond(finite, run, skip, args=(tuple(args), tuple(values)))

    def _track(self, x, y, y_pred, sample_weight, loss, finite,
               meta_norm=None, ste_norm=None):
        # A skipped step does not enter the epoch averages (weight 0, value 0:
        # a NaN times 0 would still poison a Mean).
        batch = ops.cast(tf.shape(tf.nest.flatten(x)[0])[0], "float32")
        weight = ops.where(finite, 1.0, 0.0)
        safe_loss = ops.where(finite, distribute.unscale_loss(loss), 0.0)
        self._loss_tracker.update_state(safe_loss, sample_weight=batch * weight)
        if meta_norm is not None:
            self.meta_loss_tracker.update_state(safe_loss, sample_weight=weight)
            ratio = meta_norm / ops.maximum(ste_norm, 1e-30)
            self.grad_ratio_tracker.update_state(
                ops.where(finite, ratio, 0.0), sample_weight=weight
            )
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        logs = dict(logs)
        logs["skipped_steps"] = self.skipped_steps
        return logs

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
            logs = self._ste_step(x, y, sample_weight)
        elif self.semantics == "paper":
            logs = self._paper_step(x, y, sample_weight)
        else:
            logs = self._code_step(x, y, sample_weight)
        return distribute.as_multi_worker_logs(logs)

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

    def _ste_step(self, x, y, sample_weight):
        """Keras' ordinary step through the wrappers (STE), skipping non-finite ones."""
        variables = self.base_variables
        scaling = LossScaling(self.optimizer)
        saved = self._forward_state()
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            scaled_loss = scaling.scale(loss)
        grads = scaling.unscale(tape.gradient(scaled_loss, variables))
        pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
        finite = distribute.all_replicas(self._all_finite([loss] + list(grads)))

        def apply(grads):
            scaling.optimizer.apply_gradients(zip(grads, [v for _, v in pairs]))

        self._guarded(finite, apply, ([g for g, _ in pairs],), saved)
        return self._track(x, y, y_pred, sample_weight, loss, finite)

    def _code_step(self, x, y, sample_weight):
        scaling = LossScaling(self.optimizer)
        lr = ops.cast(self.optimizer.learning_rate, "float32")
        first = ops.equal(self.meta_step, 0)
        active, others, bias_slots = self._partition()
        slots = [self._slots[i] for i in active]
        kernels = [s.variable for _, s in slots]
        phi = self.meta_network.trainable_variables
        saved = self._forward_state()
        app = self._meta_application()
        m_all = self._split(app.m)
        ms = [m_all[i] for i in active]

        with tf.GradientTape() as tape:
            latents, looks, calibs = {}, [], []
            for (w, s), m in zip(slots, ms):
                W = ops.convert_to_tensor(s.variable)
                calib = s.quantizer.calibration(W, s.channel_axes)
                u = calib * m
                V = W - lr * (u + ops.stop_gradient(s.prev_update - u))
                latents[id(s.variable)] = V
                looks.append(V)
                calibs.append(calib)
            for bs in bias_slots:
                b = ops.convert_to_tensor(bs.variable)
                latents[id(bs.variable)] = b - lr * ops.stop_gradient(bs.prev_update)
            y_pred, loss, records = self._forward_loss(x, y, sample_weight, latents)
            scaled_loss = scaling.scale(loss)

        w_tildes, g_what, g_look, g_other = self._look_ahead_grads(
            tape, scaled_loss, scaling, records, looks, others)
        n_k = len(kernels)
        # dL/dphi through V = W - lr * calib * m: dL/dm = -lr * calib * dL/dV.
        # Built from all-reduced dL/dV, so the same on every replica.
        g_phi = app.vjp(self._cotangent(
            active, [-lr * c * g for c, g in zip(calibs, g_look)]))
        reg = self._regularization_grads(kernels)
        g_kernel = [
            c * ops.stop_gradient(m) + (0.0 if r is None else r)
            for c, m, r in zip(calibs, ms, reg)
        ]
        bias_vars = [bs.variable for bs in bias_slots]
        bias_ids = {id(b): i for i, b in enumerate(bias_vars)}
        g_bias = [ops.zeros_like(b) for b in bias_vars]
        for v, g in zip(others, g_other):
            if id(v) in bias_ids and g is not None:
                g_bias[bias_ids[id(v)]] = g
        g_bias = distribute.all_reduce_sum(g_bias)
        # Per-replica partial gradients (the optimizers sum them over replicas).
        other_pairs = [(g, v) for g, v in zip(g_other, others) if g is not None]

        def record_first_step(g_look, g_bias):
            # Iteration 0 updates nothing; its raw STE gradients become r'.
            for (_, s), g in zip(slots, g_look):
                s.prev_update.assign(g)
            for bs, g in zip(bias_slots, g_bias):
                bs.prev_update.assign(g)

        def update(g_phi, g_kernel, g_other, new_state):
            # The state first: chunked, it is recomputed, and must see the
            # phi that produced this step's m.
            if self._carries_state:
                app.write_state(self.meta_state, new_state)
            self.meta_optimizer.apply_gradients(zip(g_phi, phi))
            tracked = kernels + bias_vars
            before = [ops.convert_to_tensor(v) + 0.0 for v in tracked]
            scaling.optimizer.apply_gradients(
                list(zip(g_kernel, kernels))
                + list(zip(g_other, [v for _, v in other_pairs]))
            )
            updates = [_safe_divide(b - ops.convert_to_tensor(v), lr)
                       for b, v in zip(before, tracked)]
            for (_, s), r in zip(slots, updates[:n_k]):
                s.prev_update.assign(r)
            for bs, r in zip(bias_slots, updates[n_k:]):
                bs.prev_update.assign(r)

        finite = distribute.all_replicas(self._all_finite(
            [loss] + g_phi + g_kernel + list(g_other) + g_what + g_look
            + app.state_checks()
        ))
        # Three guarded pieces rather than nested conds: a cond whose branch
        # synchronises replicas must be entered from cross-replica context.
        distribute.cond(ops.logical_and(finite, first), record_first_step,
                        distribute.noop, args=(g_look, g_bias))
        distribute.cond(
            ops.logical_and(finite, ops.logical_not(first)), update, distribute.noop,
            args=(distribute.for_optimizer(g_phi), distribute.for_optimizer(g_kernel),
                  [g for g, _ in other_pairs], app.new_state or ()),
        )
        self._guarded(finite, self._record_state, (g_what, w_tildes), saved)
        return self._track(x, y, y_pred, sample_weight, loss, finite,
                           _global_norm(g_kernel), _global_norm(g_look))

    def _paper_step(self, x, y, sample_weight):
        scaling = LossScaling(self.optimizer)
        lr = ops.cast(self.optimizer.learning_rate, "float32")
        first = ops.equal(self.meta_step, 0)
        active, others, _ = self._partition()
        slots = [self._slots[i] for i in active]
        kernels = [s.variable for _, s in slots]
        phi = self.meta_network.trainable_variables
        reg = self._regularization_grads(kernels)
        saved = self._forward_state()

        app = self._meta_application()
        m_all = self._split(app.m)
        ms = [m_all[i] for i in active]
        calibs = [
            s.quantizer.calibration(ops.convert_to_tensor(s.variable), s.channel_axes)
            for _, s in slots
        ]
        g_kernel = [
            c * ops.stop_gradient(m) + (0.0 if r is None else r)
            for c, m, r in zip(calibs, ms, reg)
        ]

        def step_kernels(g_kernel):
            scaling.optimizer.apply_gradients(zip(g_kernel, kernels))

        # A non-finite meta output never reaches the kernels (m, hence
        # finite_m, is the same on every replica).
        finite_m = self._all_finite(g_kernel)
        distribute.cond(ops.logical_and(finite_m, ops.logical_not(first)),
                        step_kernels, distribute.noop,
                        args=(distribute.for_optimizer(g_kernel),))
        # The look-ahead is the kernel after the real update,
        # V = W - lr * calib * m, so dV/dm = -lr * calib (used for g_phi below).
        looks = [ops.convert_to_tensor(v) + 0.0 for v in kernels]

        latents = {id(v): V for v, V in zip(kernels, looks)}
        with tf.GradientTape() as tape:
            tape.watch(looks)
            y_pred, loss, records = self._forward_loss(x, y, sample_weight, latents)
            scaled_loss = scaling.scale(loss)
        w_tildes, g_what, g_look, g_other = self._look_ahead_grads(
            tape, scaled_loss, scaling, records, looks, others)

        # Eq. 8: the meta network's output at this step's (dL/dW_hat, W_tilde)
        # stands in for the STE as dL/dW_tilde when differentiating w.r.t. phi.
        # (At the state this step leaves, or the zero state when it is reset.)
        if self._carries_state:
            m_now = app.then_apply(self._flat(g_what), self._flat(w_tildes))
        else:
            m_now = self._meta_application(g_what, w_tildes, fresh=True).m
        m_now = self._split(m_now)
        # dL/dV := calib(V) * m_now, and dV/dm = -lr * calib(W).
        cotangent = self._cotangent(active, [
            -lr * c * s.quantizer.calibration(V, s.channel_axes) * m_now[i]
            for i, c, (_, s), V in zip(active, calibs, slots, looks)
        ])
        # Built from all-reduced dL/dW_hat: the same on every replica.
        g_phi = app.vjp(cotangent)
        other_pairs = [(g, v) for g, v in zip(g_other, others) if g is not None]

        def update(g_phi, g_other, new_state):
            if self._carries_state:  # before phi moves (see _code_step)
                app.write_state(self.meta_state, new_state)
            self.meta_optimizer.apply_gradients(zip(g_phi, phi))
            if other_pairs:
                self._rest_optimizer.apply_gradients(
                    zip(g_other, [v for _, v in other_pairs])
                )

        finite = ops.logical_and(finite_m, distribute.all_replicas(self._all_finite(
            [loss] + g_phi + list(g_other) + g_what + g_look + app.state_checks()
        )))
        distribute.cond(
            ops.logical_and(finite, ops.logical_not(first)), update, distribute.noop,
            args=(distribute.for_optimizer(g_phi), [g for g, _ in other_pairs],
                  app.new_state or ()),
        )
        self._guarded(finite, self._record_state, (g_what, w_tildes), saved)
        return self._track(x, y, y_pred, sample_weight, loss, finite,
                           _global_norm(g_kernel), _global_norm(g_look))
