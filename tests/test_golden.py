"""Step-by-step fidelity to the official PyTorch MetaQuant code.

`../shared/golden/metaquant_reference_dorefa_sgd.npz` holds four iterations of
the reference code (HEAD 50694404, run unchanged) on a tiny net: conv 1->2 3x3
(no bias) -> ReLU -> flatten in (c, h, w) order -> linear 32->4 with bias,
1-bit DoReFa, SGD lr 0.1, meta Adam 1e-3, for FC-Grad, MultiFC, LSTMFC and the
plain STE baseline. We feed the same initial weights and data to our
`MetaQuantModel` and compare every recorded quantity after every step.
"""

import numpy as np
import keras
import pytest

import mq_keras as mqk

ITERS = 4
LR = 0.1
RTOL, ATOL = 2e-5, 2e-6

# Reference name -> (our meta network name, {their param: (our attr, to_keras)})
_T = lambda a: np.asarray(a).T  # noqa: E731
_ID = lambda a: np.asarray(a)  # noqa: E731
META = {
    "FC-Grad": ("fc_grad", {"linear1.weight": ("w1", _T), "linear2.weight": ("w2", _T)}),
    "MultiFC": ("multifc", {
        "network.Linear0.weight": ("kernels.0", _T),
        "network.Linear1.weight": ("kernels.1", _T),
        "network.Linear2.weight": ("kernels.2", _T),
    }),
    "LSTMFC": ("lstmfc", {
        "lstm1.weight_ih_l0": ("kernel", _T),
        "lstm1.weight_hh_l0": ("recurrent_kernel", _T),
        "lstm1.bias_ih_l0": ("bias_ih", _ID),
        "lstm1.bias_hh_l0": ("bias_hh", _ID),
        "fc1.weight": ("fc_kernel", _T),
        "fc1.bias": ("fc_bias", _ID),
    }),
}


def _conv_to_keras(w):  # OIHW -> HWIO
    return np.asarray(w).transpose(2, 3, 1, 0)


def _keras_order(torch_shape, kind):
    """Index into a torch-flattened kernel for each Keras-flattened element."""
    idx = np.arange(int(np.prod(torch_shape))).reshape(torch_shape)
    return (idx.transpose(2, 3, 1, 0) if kind == "conv" else idx.T).ravel()


def _tiny_net(golden):
    inp = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(2, 3, use_bias=False, name="conv1")(inp)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Permute((3, 1, 2))(x)  # NHWC -> NCHW before flatten, as torch
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(4, name="fc")(x)
    model = keras.Model(inp, out)
    model.get_layer("conv1").set_weights([_conv_to_keras(golden["init/net/layer0/W"])])
    model.get_layer("fc").set_weights(
        [golden["init/net/layer1/W"].T, golden["init/net/layer1/b"]]
    )
    return model


def _data(golden, t):
    x = golden["data/x"][t].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    return x.astype("float32"), golden["data/y"][t].astype("int64")


def _meta_var(meta, attr):
    if "." in attr:
        name, i = attr.split(".")
        return getattr(meta, name)[int(i)]
    return getattr(meta, attr)


def _compile(qmodel, meta_optimizer=None):
    qmodel.compile(
        optimizer=keras.optimizers.SGD(LR),
        meta_optimizer=meta_optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def _kernels(qmodel):
    conv, fc = qmodel.wrappers
    return conv, fc


def _check_layers(qmodel, golden, prefix, *, state=True):
    conv, fc = _kernels(qmodel)
    np.testing.assert_allclose(
        conv.slots[0].variable.numpy(), _conv_to_keras(golden[f"{prefix}/layer0/W"]),
        rtol=RTOL, atol=ATOL, err_msg=f"{prefix} conv W")
    np.testing.assert_allclose(
        fc.slots[0].variable.numpy(), golden[f"{prefix}/layer1/W"].T,
        rtol=RTOL, atol=ATOL, err_msg=f"{prefix} fc W")
    np.testing.assert_allclose(
        fc.bias_variable.numpy(), golden[f"{prefix}/layer1/b"],
        rtol=RTOL, atol=ATOL, err_msg=f"{prefix} fc b")
    if not state:
        return
    for k, (w, to_keras) in enumerate(((conv, _conv_to_keras), (fc, _T))):
        slot = w.slots[0]
        np.testing.assert_allclose(
            slot.prev_grad.numpy(), to_keras(golden[f"{prefix}/layer{k}/quantized_grads"]),
            rtol=1e-4, atol=1e-7, err_msg=f"{prefix} layer{k} dL/dW_hat")
        np.testing.assert_allclose(
            slot.prev_w_tilde.numpy(), to_keras(golden[f"{prefix}/layer{k}/W_tilde"]),
            rtol=RTOL, atol=ATOL, err_msg=f"{prefix} layer{k} W_tilde")


def _loss(qmodel, x, y):
    qmodel.reset_metrics()
    return qmodel.train_on_batch(x, y, return_dict=True)["loss"]


@pytest.mark.parametrize("ref_name", list(META))
def test_metaquant_matches_reference_step_by_step(golden, ref_name):
    name, params = META[ref_name]
    prefix0 = f"dorefa/{ref_name}/SGD"
    qmodel = mqk.quantize_model(
        _tiny_net(golden), kernel_quantizer="dorefa", num_bits=1,
        meta_network=name, verbose=False,
    )
    meta = qmodel.meta_network
    for p, (attr, conv) in params.items():
        _meta_var(meta, attr).assign(conv(golden[f"init/meta/{ref_name}/{p}"]))
    _compile(qmodel, mqk.PaperAdam(1e-3))

    for t in range(ITERS):
        prefix = f"{prefix0}/iter{t}"
        loss = _loss(qmodel, *_data(golden, t))
        np.testing.assert_allclose(loss, golden[f"{prefix}/loss"], rtol=RTOL,
                                   err_msg=f"{prefix} loss")
        _check_layers(qmodel, golden, prefix)
        if t == 0:
            continue
        for p, (attr, conv) in params.items():
            np.testing.assert_allclose(
                _meta_var(meta, attr).numpy(), conv(golden[f"{prefix}/meta/{p}"]),
                rtol=1e-4, atol=1e-7, err_msg=f"{prefix} meta {p}")
        if ref_name == "LSTMFC":
            h, c = (v.numpy() for v in qmodel.meta_state)
            order = np.concatenate([
                _keras_order((2, 1, 3, 3), "conv"),
                18 + _keras_order((4, 32), "fc"),
            ])
            ref_h = np.concatenate([golden[f"{prefix}/layer{k}/lstm_h"][0] for k in (0, 1)])
            ref_c = np.concatenate([golden[f"{prefix}/layer{k}/lstm_c"][0] for k in (0, 1)])
            np.testing.assert_allclose(h, ref_h[order], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(c, ref_c[order], rtol=1e-4, atol=1e-6)


def test_ste_baseline_matches_reference(golden):
    qmodel = mqk.quantize_model(
        _tiny_net(golden), kernel_quantizer="dorefa", num_bits=1,
        estimator="ste", verbose=False,
    )
    _compile(qmodel)
    for t in range(ITERS):
        prefix = f"baseline/dorefa/SGD/iter{t}"
        loss = _loss(qmodel, *_data(golden, t))
        np.testing.assert_allclose(loss, golden[f"{prefix}/loss"], rtol=RTOL)
        _check_layers(qmodel, golden, prefix, state=False)


def test_first_iteration_updates_nothing(golden):
    qmodel = mqk.quantize_model(_tiny_net(golden), meta_network="multifc", verbose=False)
    _compile(qmodel, mqk.PaperAdam(1e-3))
    before = [v.numpy().copy() for v in qmodel.trainable_variables]
    _loss(qmodel, *_data(golden, 0))
    after = [v.numpy() for v in qmodel.trainable_variables]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert int(qmodel.optimizer.iterations.numpy()) == 0
    assert int(qmodel.meta_optimizer.iterations.numpy()) == 0
    assert int(qmodel.meta_step.numpy()) == 1
