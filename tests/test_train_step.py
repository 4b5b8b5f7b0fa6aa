"""One MetaQuant step computed by hand in NumPy equals `train_step`.

The model is a single Dense layer (3 -> 2, with bias), 1-bit DoReFa, FC-Grad
meta network (m = (g @ w1) @ w2), meta optimizer plain SGD so that its update
is easy to write down. We place the model at a non-first step with known
state (dL/dW_hat, W_tilde, last update r of W and of b), run one `train_step`
and compare the look-ahead loss, the meta gradient's effect on phi, the new W
and b and the stored state with a float64 NumPy computation.
"""

import numpy as np
import keras
import pytest

import mq_keras as mqk

B, IN, OUT, H = 6, 3, 2, 5
LR, META_LR = 0.1, 0.05


def _dorefa1(v):
    t = np.tanh(v)
    wt = t / (2 * np.abs(t).max()) + 0.5
    return wt, 2 * np.round(wt) - 1


def _calib(v):
    t = np.tanh(v)
    return (1 - t**2) / np.abs(t).max()


class _DoReFa1:
    """1-bit DoReFa: W_tilde, W_hat, dL/dV through the STE, calib."""

    name = "dorefa"

    @staticmethod
    def forward(v):
        return _dorefa1(v)

    @staticmethod
    def ste(v, g_what):
        return _calib(v) * g_what

    calib = staticmethod(_calib)


class _BWN:
    """The official code's BWN: W_hat = alpha sign(V), STE alpha * g * gate,
    yet calib = 1 (the meta output replaces dL/dW without the alpha)."""

    name = "bwn"

    @staticmethod
    def forward(v):
        return v, np.abs(v).mean() * np.where(v >= 0, 1.0, -1.0)

    @staticmethod
    def ste(v, g_what):
        return np.abs(v).mean() * g_what * (np.abs(v) <= 1.0)

    @staticmethod
    def calib(v):
        return np.ones_like(v)


QUANT = {"dorefa": _DoReFa1, "bwn": _BWN}


def _forward_grads(x, y, w_hat, b):
    """Loss, dL/dW_hat and dL/db of mean softmax cross-entropy."""
    logits = x @ w_hat + b
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    loss = -np.mean(np.log(p[np.arange(len(y)), y]))
    d = (p - np.eye(OUT)[y]) / len(y)
    return loss, x.T @ d, d.sum(axis=0)


def _keras_adam_step(w, g, lr, b1=0.9, b2=0.999, eps=1e-7):
    """First step of keras.optimizers.Adam from zero state."""
    m = (1 - b1) * g
    v = (1 - b2) * g * g
    alpha = lr * np.sqrt(1 - b2) / (1 - b1)
    return w - alpha * m / (np.sqrt(v) + eps)


def _base_step(w, g, opt):
    return w - LR * g if opt == "sgd" else _keras_adam_step(w, g, LR)


def _fc_grad_meta_grads(dl_dm, g, w1, w2):
    """dL/dw1, dL/dw2 for m = (g @ w1) @ w2 given dL/dm (all (N, 1))."""
    s = float(np.sum(dl_dm * g))
    return s * w2.T, s * w1.T


class _State:
    def __init__(self, rng):
        self.x = rng.normal(size=(B, IN))
        self.y = rng.integers(0, OUT, size=B)
        self.w = rng.normal(scale=0.7, size=(IN, OUT))
        self.b = rng.normal(scale=0.1, size=OUT)
        self.prev_g = rng.normal(scale=0.2, size=(IN, OUT))
        self.prev_wt = rng.uniform(size=(IN, OUT))
        self.prev_r = rng.normal(scale=0.3, size=(IN, OUT))
        self.prev_rb = rng.normal(scale=0.3, size=OUT)
        self.w1 = rng.uniform(-1, 1, size=(1, H))
        self.w2 = rng.uniform(-0.5, 0.5, size=(H, 1))


def _build(s, semantics, opt, quant="dorefa"):
    inp = keras.Input((IN,))
    out = keras.layers.Dense(OUT, name="fc")(inp)
    model = keras.Model(inp, out)
    model.get_layer("fc").set_weights([s.w, s.b])
    q = mqk.quantize_model(model, kernel_quantizer=quant,
                           meta_network="fc_grad", semantics=semantics,
                           meta_network_options={"hidden_size": H}, verbose=False)
    q.meta_network.w1.assign(s.w1)
    q.meta_network.w2.assign(s.w2)
    (w,) = q.wrappers
    slot = w.slots[0]
    slot.prev_grad.assign(s.prev_g)
    slot.prev_w_tilde.assign(s.prev_wt)
    slot.prev_update.assign(s.prev_r)
    w.bias_prev_update.assign(s.prev_rb)
    q.meta_step.assign(5)  # any non-first step
    base = keras.optimizers.SGD(LR) if opt == "sgd" else keras.optimizers.Adam(LR)
    q.compile(optimizer=base, meta_optimizer=keras.optimizers.SGD(META_LR),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return q, w


def _expected_code(s, opt, q=_DoReFa1):
    k = (s.w1 @ s.w2).item()
    m = k * s.prev_g
    v = s.w - LR * s.prev_r
    bv = s.b - LR * s.prev_rb
    wt, w_hat = q.forward(v)
    loss, g_what, g_b = _forward_grads(s.x, s.y, w_hat, bv)
    dl_dv = q.ste(v, g_what)
    dl_dm = dl_dv * (-LR * q.calib(s.w))
    gw1, gw2 = _fc_grad_meta_grads(dl_dm.reshape(-1, 1), s.prev_g.reshape(-1, 1), s.w1, s.w2)
    w_new = _base_step(s.w, q.calib(s.w) * m, opt)
    b_new = _base_step(s.b, g_b, opt)
    return dict(loss=loss, w=w_new, b=b_new, w1=s.w1 - META_LR * gw1,
                w2=s.w2 - META_LR * gw2, prev_g=g_what, prev_wt=wt,
                prev_r=(s.w - w_new) / LR, prev_rb=(s.b - b_new) / LR)


def _expected_paper(s, opt, q=_DoReFa1):
    k = (s.w1 @ s.w2).item()
    m = k * s.prev_g
    w_new = _base_step(s.w, q.calib(s.w) * m, opt)
    wt, w_hat = q.forward(w_new)
    loss, g_what, g_b = _forward_grads(s.x, s.y, w_hat, s.b)
    # Eq. 8: the meta output at (dL/dW_hat, W_tilde) of this step replaces the
    # STE (so BWN's alpha never enters here).
    dl_dv = q.calib(w_new) * (k * g_what)
    dl_dm = dl_dv * (-LR * q.calib(s.w))
    gw1, gw2 = _fc_grad_meta_grads(dl_dm.reshape(-1, 1), s.prev_g.reshape(-1, 1), s.w1, s.w2)
    b_new = _base_step(s.b, g_b, opt)
    return dict(loss=loss, w=w_new, b=b_new, w1=s.w1 - META_LR * gw1,
                w2=s.w2 - META_LR * gw2, prev_g=g_what, prev_wt=wt)


@pytest.mark.parametrize(
    "quant, opt", [("dorefa", "sgd"), ("dorefa", "adam"), ("bwn", "sgd")])
@pytest.mark.parametrize("semantics", ["code", "paper"])
def test_one_step_matches_numpy(semantics, opt, quant):
    s = _State(np.random.default_rng(7))
    q, w = _build(s, semantics, opt, quant)
    logs = q.train_on_batch(s.x.astype("float32"), s.y, return_dict=True)
    expected = _expected_code if semantics == "code" else _expected_paper
    exp = expected(s, opt, QUANT[quant])
    tol = dict(rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(logs["loss"], exp["loss"], **tol)
    np.testing.assert_allclose(logs["meta_loss"], exp["loss"], **tol)
    np.testing.assert_allclose(w.slots[0].variable.numpy(), exp["w"], **tol)
    np.testing.assert_allclose(w.bias_variable.numpy(), exp["b"], **tol)
    np.testing.assert_allclose(q.meta_network.w1.numpy(), exp["w1"], **tol)
    np.testing.assert_allclose(q.meta_network.w2.numpy(), exp["w2"], **tol)
    np.testing.assert_allclose(w.slots[0].prev_grad.numpy(), exp["prev_g"], **tol)
    np.testing.assert_allclose(w.slots[0].prev_w_tilde.numpy(), exp["prev_wt"], **tol)
    if semantics == "code":
        np.testing.assert_allclose(w.slots[0].prev_update.numpy(), exp["prev_r"],
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(w.bias_prev_update.numpy(), exp["prev_rb"],
                                   rtol=1e-4, atol=1e-5)
    # The meta network really moved: its gradient was not zero.
    assert not np.allclose(exp["w1"], s.w1)


def test_fc_grad_with_k_one_reproduces_ste():
    """Frozen FC-Grad with k = 1 under paper semantics is STE-SGD one step late.

    With m = dL/dW_hat of the previous forward, which (paper semantics) ran at
    the current weights, the W update is exactly the STE step on the previous
    batch. So W after MetaQuant step t+1 equals W after STE step t.
    """
    rng = np.random.default_rng(3)
    steps = 5
    xs = rng.normal(size=(steps, 8, 6, 6, 1)).astype("float32")
    ys = rng.integers(0, 4, size=(steps, 8))

    def net():
        keras.utils.set_random_seed(11)
        inp = keras.Input((6, 6, 1))
        h = keras.layers.Conv2D(3, 3, use_bias=False)(inp)
        h = keras.layers.Flatten()(keras.layers.ReLU()(h))
        return keras.Model(inp, keras.layers.Dense(4, use_bias=False)(h))

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    ste = mqk.quantize_model(net(), estimator="ste", verbose=False)
    ste.compile(optimizer=keras.optimizers.SGD(LR), loss=loss)
    meta = mqk.quantize_model(net(), meta_network="fc_grad", semantics="paper",
                              meta_network_options={"hidden_size": 1}, verbose=False)
    meta.meta_network.w1.assign([[1.0]])
    meta.meta_network.w2.assign([[1.0]])
    meta.compile(optimizer=keras.optimizers.SGD(LR),
                 meta_optimizer=keras.optimizers.SGD(0.0), loss=loss)

    meta.train_on_batch(xs[0], ys[0])  # records the first gradient only
    for t in range(steps - 1):
        ste.train_on_batch(xs[t], ys[t])
        meta.train_on_batch(xs[t + 1], ys[t + 1])
        for a, b in zip(ste.wrappers, meta.wrappers):
            np.testing.assert_allclose(
                b.slots[0].variable.numpy(), a.slots[0].variable.numpy(),
                rtol=1e-5, atol=1e-6, err_msg=f"step {t}")
    # And the weights did move.
    assert not np.allclose(meta.wrappers[1].slots[0].variable.numpy(),
                           net().layers[-1].get_weights()[0])


@pytest.mark.parametrize("per_channel", [False, True])
def test_bwn_ste_step_carries_alpha(per_channel):
    """STE + SGD on BWN moves W by lr * alpha * dL/dW_hat * 1[|W| <= 1]."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(B, IN)).astype("float32")
    y = rng.integers(0, OUT, size=B)
    w0 = rng.normal(scale=0.7, size=(IN, OUT))
    w0[0, 0] = 1.5  # outside the gate
    b0 = rng.normal(scale=0.1, size=OUT)
    inp = keras.Input((IN,))
    model = keras.Model(inp, keras.layers.Dense(OUT, name="fc")(inp))
    model.get_layer("fc").set_weights([w0, b0])
    q = mqk.quantize_model(model, kernel_quantizer="bwn", estimator="ste",
                           quantizer_options={"per_channel": per_channel},
                           verbose=False)
    q.compile(optimizer=keras.optimizers.SGD(LR),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.train_on_batch(x, y)
    axis = 0 if per_channel else None
    alpha = np.abs(w0).mean(axis=axis, keepdims=per_channel)
    w_hat = alpha * np.where(w0 >= 0, 1.0, -1.0)
    _, g_what, _ = _forward_grads(x, y, w_hat, b0)
    expected = w0 - LR * alpha * g_what * (np.abs(w0) <= 1.0)
    np.testing.assert_allclose(q.wrappers[0].slots[0].variable.numpy(), expected,
                               rtol=1e-5, atol=1e-7)
    assert q.wrappers[0].slots[0].variable.numpy()[0, 0] == np.float32(1.5)
