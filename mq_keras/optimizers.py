"""Optimizers that MetaQuant's published numbers depend on."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="mq_keras")
class PaperAdam(keras.optimizers.Adam):
    """Adam as in Kingma & Ba's Algorithm 1: epsilon is added to sqrt(v_hat).

    Update, with `t` the 1-based step::

        m = m + (1 - beta_1) * (g - m);   v = beta_2 * v + (1 - beta_2) * g^2
        var -= (lr / (1 - beta_1^t)) * m / (sqrt(v) / sqrt(1 - beta_2^t) + eps)

    `keras.optimizers.Adam` adds epsilon to the *uncorrected* sqrt(v) instead.
    The difference matters when gradients are near epsilon, as the meta
    network's are (median ~1e-6 for LSTMFC): the reference MetaQuant code
    trains its meta network with this form (torch.optim.Adam), so it is the
    faithful meta optimizer. Defaults follow the reference: lr 1e-3, eps 1e-8.
    """

    def __init__(self, learning_rate=1e-3, *, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-8, name="paper_adam", **kwargs):
        if kwargs.get("amsgrad"):
            raise ValueError("PaperAdam does not implement amsgrad.")
        super().__init__(learning_rate=learning_rate, beta_1=beta_1,
                         beta_2=beta_2, epsilon=epsilon, name=name, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        step = ops.cast(self.iterations + 1, dtype)
        b1 = ops.cast(self.beta_1, dtype)
        b2 = ops.cast(self.beta_2, dtype)
        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        self.assign_add(m, ops.multiply(ops.subtract(gradient, m), 1.0 - b1))
        self.assign(v, ops.add(ops.multiply(v, b2),
                               ops.multiply(ops.square(gradient), 1.0 - b2)))
        bias_correction1 = 1.0 - ops.power(b1, step)
        bias_correction2_sqrt = ops.sqrt(1.0 - ops.power(b2, step))
        denom = ops.add(ops.divide(ops.sqrt(v), bias_correction2_sqrt), self.epsilon)
        self.assign_sub(variable, ops.multiply(lr / bias_correction1,
                                               ops.divide(m, denom)))
