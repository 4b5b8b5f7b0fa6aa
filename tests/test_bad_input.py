"""Wrong uses of the public API: each raises a specific error that names both
what is wrong (the bad value) and what to do instead (allowed values, the fix).
"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import mq_keras as mqk
from mq_keras import export, meta_networks, quantizers, tflite_weights
from mq_keras.layers import MetaQuantWrapper

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
ALL_BITS = r"\[1, 2, 3, 4, 5, 6, 7, 8\]"
UNIFORM_BITS = r"\[2, 3, 4, 5, 6, 7, 8\]"


def _cnn():
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, name="c1")(inp)
    x = keras.layers.Flatten(name="flat")(x)
    return keras.Model(inp, keras.layers.Dense(3, name="fc")(x), name="cnn")


def _data(n=4):
    rng = np.random.default_rng(0)
    return (rng.normal(size=(n, 8, 8, 1)).astype("float32"),
            rng.integers(0, 3, size=n))


def _quantize(**kwargs):
    return mqk.quantize_model(_cnn(), verbose=False, **kwargs)


@pytest.fixture(scope="module")
def qmodel():
    """An untrained quantized model (the export checks run before converting)."""
    return mqk.quantize_model(_cnn(), verbose=False)


@pytest.fixture(scope="module")
def float_blob(qmodel):
    return mqk.convert_to_tflite(qmodel, mode="float")


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.fc = keras.layers.Dense(2)

    def call(self, x):
        return self.fc(x)


# ----------------------------------------------------------------- bit widths
@pytest.mark.parametrize("quantizer,bits,match", [
    ("dorefa", 0, rf"DoReFa: num_bits=0 is not supported; allowed values are {ALL_BITS}"),
    ("dorefa", 9, rf"DoReFa: num_bits=9 is not supported; allowed values are {ALL_BITS}"),
    ("bwn", 2, r"BWN: num_bits=2 is not supported; allowed values are \[1\]"),
    ("ternary", 1, r"Ternary: num_bits=1 is not supported; allowed values are \[2\]"),
    ("ternary", 3, r"Ternary: num_bits=3 is not supported; allowed values are \[2\]"),
    ("uniform", 1, rf"Uniform: num_bits=1 is not supported; allowed values are {UNIFORM_BITS}"),
    ("uniform", 9, rf"Uniform: num_bits=9 is not supported; allowed values are {UNIFORM_BITS}"),
])
def test_bit_width_out_of_range(quantizer, bits, match):
    with pytest.raises(ValueError, match=match):
        _quantize(kernel_quantizer=quantizer, num_bits=bits)
    with pytest.raises(ValueError, match=match):
        MetaQuantWrapper(keras.layers.Dense(3), kernel_quantizer=quantizer,
                         num_bits=bits)


@pytest.mark.parametrize("quantizer,bits,match", [
    ("dorefa", 2.5, rf"num_bits must be an int in {ALL_BITS}, got 2\.5 \(float\); "
                    r"pass e\.g\. num_bits=8"),
    ("uniform", "4", rf"num_bits must be an int in {UNIFORM_BITS}, got '4' \(str\); "
                     r"pass e\.g\. num_bits=4"),
    ("dorefa", 4.0, r"got 4\.0 \(float\); pass e\.g\. num_bits=4"),
    ("dorefa", True, r"got True \(bool\); pass e\.g\. num_bits=1"),
])
def test_non_integer_bit_width(quantizer, bits, match):
    with pytest.raises(ValueError, match=match):
        quantizers.get(quantizer, num_bits=bits)


def test_numpy_integer_bit_width_is_a_plain_int():
    # Not an error: a width from np.arange works and stays JSON-serializable.
    q = quantizers.get("dorefa", num_bits=np.int64(4))
    assert q.get_config() == {"num_bits": 4} and type(q.num_bits) is int


# ------------------------------------------------------- quantizer names, options
def test_unknown_quantizer_name():
    with pytest.raises(ValueError, match=r"Unknown kernel_quantizer 'sign'; allowed "
                       r"names are \['bwn', 'dorefa', 'ternary', 'uniform'\]"):
        _quantize(kernel_quantizer="sign")


def test_quantizer_of_the_wrong_type():
    with pytest.raises(ValueError, match=r"must be a string, a dict or a Quantizer, "
                       r"got 3; pass one of \['bwn', .*DoReFa\(num_bits=2\)"):
        _quantize(kernel_quantizer=3)


def test_quantizer_dict_of_an_unregistered_class():
    with pytest.raises(TypeError, match=r"Could not locate class 'Nope'.*"
                       r"register_keras_serializable"):
        quantizers.get({"class_name": "Nope", "config": {}})


def test_quantizer_dict_of_another_class():
    # It used to return the optimizer as the layer's "quantizer".
    config = keras.saving.serialize_keras_object(keras.optimizers.SGD())
    with pytest.raises(ValueError, match=r"describes a SGD, not a Quantizer; pass a "
                       r"serialized quantizer \(mq_keras\.quantizers\.serialize"):
        quantizers.get(config)


@pytest.mark.parametrize("quantizer,options,match", [
    ("bwn", {"per_chanel": True},
     r"unknown option\(s\) \['per_chanel'\]; its options are \['delta', 'gradient', "
     r"'per_channel'\]"),
    ("dorefa", {"per_channel": True},
     r"unknown option\(s\) \['per_channel'\]; its options are \['delta', 'gradient'\]"),
    ("uniform", {"per_channel": True, "symmetric": False},
     r"unknown option\(s\) \['symmetric'\]; its options are \['delta', 'gradient', "
     r"'per_channel'\]"),
])
def test_unknown_quantizer_options(quantizer, options, match):
    with pytest.raises(ValueError, match=match):
        _quantize(kernel_quantizer=quantizer, quantizer_options=options)


@pytest.mark.parametrize("value", ["no", 0, None])
def test_per_channel_must_be_a_bool(value):
    # bool("no") is True: it used to pick per-channel statistics silently.
    with pytest.raises(ValueError, match=rf"BWN: per_channel must be True or "
                       rf"False, got {re.escape(repr(value))}"):
        _quantize(kernel_quantizer="bwn", quantizer_options={"per_channel": value})


def test_num_bits_inside_quantizer_options():
    with pytest.raises(ValueError, match=r"quantizer_options must not contain "
                       r"'num_bits'; pass num_bits=2 to quantize_model itself"):
        _quantize(kernel_quantizer="uniform", quantizer_options={"num_bits": 2})


def test_quantizer_options_not_a_dict():
    with pytest.raises(ValueError, match=r"quantizer_options must be a dict of "
                       r"keyword options, e\.g\. \{'per_channel': True\}, got 3"):
        _quantize(quantizer_options=3)


def test_num_bits_contradicting_a_quantizer_instance():
    # It used to be ignored: the model trained at 2 bits, not 4.
    with pytest.raises(ValueError, match=r"num_bits=4 conflicts with the quantizer "
                       r"instance DoReFa\(num_bits=2\); drop num_bits, or pass "
                       r"DoReFa\(num_bits=4\)"):
        _quantize(kernel_quantizer=mqk.DoReFa(num_bits=2), num_bits=4)


def test_options_for_a_quantizer_instance():
    with pytest.raises(ValueError, match=r"only apply to a quantizer given by name.*"
                       r"set them on the instance instead, e\.g\. "
                       r"BWN\(per_channel=True\)"):
        _quantize(kernel_quantizer=mqk.BWN(), quantizer_options={"per_channel": True})


# ---------------------------------------------------------------- meta networks
def test_unknown_meta_network_name():
    with pytest.raises(ValueError, match=r"Unknown meta_network 'lstm'; allowed names "
                       r"are \['fc_grad', 'gain_mlp', 'lstmfc', 'meta_ewgs', 'multifc'\] "
                       r"\(or estimator='ste'"):
        _quantize(meta_network="lstm")


def test_unknown_meta_network_options():
    with pytest.raises(ValueError, match=r"Unknown meta_network_options "
                       r"\['hiden_size'\] for meta_network='multifc'; MultiFC takes "
                       r"\['activation', 'hidden_size', 'num_layers', 'seed'\]"):
        _quantize(meta_network="multifc", meta_network_options={"hiden_size": 3})
    with pytest.raises(ValueError, match=r"\['max_gain'\] for meta_network='lstmfc'; "
                       r"LSTMFC takes \['hidden_size', 'seed'\]"):
        _quantize(meta_network="lstmfc", meta_network_options={"max_gain": 2.0})


def test_meta_network_options_not_a_dict():
    with pytest.raises(ValueError, match=r"meta_network_options must be a dict of "
                       r"keyword options, e\.g\. \{'hidden_size': 50\}, got 'big'"):
        _quantize(meta_network_options="big")


def test_meta_network_options_with_the_ste_estimator():
    # The STE trains no meta network: the options used to vanish silently.
    with pytest.raises(ValueError, match=r"no effect with estimator='ste'.*drop "
                       r"meta_network_options or use estimator='metaquant'"):
        _quantize(estimator="ste", meta_network_options={"hidden_size": 8})


def test_meta_network_options_for_an_instance():
    with pytest.raises(ValueError, match=r"only apply to a meta network given by "
                       r"name.*e\.g\. mq_keras\.GainMLP\(hidden_size=8\)"):
        _quantize(meta_network=mqk.GainMLP(), meta_network_options={"hidden_size": 8})


@pytest.mark.parametrize("name", ["fc_grad", "multifc", "lstmfc", "gain_mlp"])
@pytest.mark.parametrize("size", [0, -3, 2.5])
def test_bad_hidden_size(name, size):
    with pytest.raises(ValueError, match=rf"hidden_size must be a positive int, "
                       rf"got {re.escape(repr(size))}"):
        _quantize(meta_network=name, meta_network_options={"hidden_size": size})


def test_multifc_with_one_layer():
    with pytest.raises(ValueError, match=r"num_layers must be an int >= 2, got 1"):
        mqk.MultiFC(num_layers=1)


def test_gain_mlp_max_gain_not_above_one():
    # (Also matches the wording proposed for meta_networks.py.)
    with pytest.raises(ValueError, match=r"max_gain must be (a finite number )?> 1, "
                       r"got 1\.0"):
        mqk.GainMLP(max_gain=1.0)


@pytest.mark.parametrize("kwargs,what", [
    ({"meta_network": "multifc"}, r"meta_network=MultiFC has no recurrent state"),
    ({"estimator": "ste"}, r"estimator='ste' has no meta network"),
])
def test_reset_meta_state_without_a_recurrent_meta_network(kwargs, what):
    # It used to be accepted and do nothing.
    with pytest.raises(ValueError, match=rf"reset_meta_state=True only applies to a "
                       rf"recurrent meta network \(meta_network='lstmfc'\), but "
                       rf"{what}; drop reset_meta_state"):
        _quantize(reset_meta_state=True, **kwargs)


# ------------------------------------------------------ estimator and semantics
def test_unknown_estimator():
    match = r"Unknown estimator 'sgd'; allowed values are \('metaquant', 'ste'"
    with pytest.raises(ValueError, match=match):
        _quantize(estimator="sgd")
    inner = _quantize().quantized_model
    with pytest.raises(ValueError, match=match):
        mqk.MetaQuantModel(inner, estimator="sgd")


def test_unknown_semantics():
    with pytest.raises(ValueError, match=r"Unknown semantics 'eq6'; allowed values "
                       r"are \('code', 'paper'\)"):
        _quantize(semantics="eq6")


# --------------------------------------------------------------------- models
def test_subclassed_model():
    sub = _Subclassed()
    sub(np.zeros((1, 3), "float32"))
    # Quantized as one unit when Keras can copy it; this one's __init__
    # takes no **kwargs, so the error says how to make it copyable.
    with pytest.raises(ValueError, match=r"(?s)Cannot copy layer .* from its config.*"
                       r"define get_config/from_config"):
        mqk.quantize_model(sub)


def test_unbuilt_sequential_model():
    with pytest.raises(ValueError, match=r"is not built\. Give it an Input \(or "
                       r"call model\.build\(input_shape\)\)"):
        mqk.quantize_model(keras.Sequential([keras.layers.Dense(2)]))


def test_a_layer_instead_of_a_model():
    with pytest.raises(ValueError, match=r"expects a built Functional or Sequential "
                       r"keras\.Model, got Dense; wrap a single layer with "
                       r"mq_keras\.MetaQuantWrapper"):
        mqk.quantize_model(keras.layers.Dense(3))


def test_quantizing_twice():
    q = _quantize()
    with pytest.raises(ValueError, match=r"is already a MetaQuantModel; quantize the "
                       r"float model once: pass the original float model"):
        mqk.quantize_model(q)
    with pytest.raises(ValueError, match=r"already contains MetaQuantWrapper layers; "
                       r"quantize the float model once"):
        mqk.quantize_model(q.quantized_model)


def test_wrapper_around_a_wrapper():
    with pytest.raises(ValueError, match=r"'quant_d' is already a MetaQuantWrapper; "
                       r"wrap the float layer once"):
        MetaQuantWrapper(MetaQuantWrapper(keras.layers.Dense(3, name="d")))


@pytest.mark.parametrize("layer", [
    keras.layers.BatchNormalization(name="bn"),
    keras.layers.LayerNormalization(name="ln"),
    keras.layers.Dropout(0.5, name="drop"),
], ids=lambda l: type(l).__name__)
def test_wrapper_around_an_unsupported_layer(layer):
    with pytest.raises(ValueError, match=rf"cannot quantize layer '{layer.name}' of "
                       rf"type {type(layer).__name__}: it neither is nor holds a layer of "
                       rf"the supported types \[.*'Conv2D'.*'Dense'.*'LSTMCell'.*\]"):
        MetaQuantWrapper(layer)


def test_model_without_a_quantizable_layer():
    no_kernel = keras.Sequential([keras.Input((3,)), keras.layers.ReLU()], name="relu")
    with pytest.raises(ValueError, match=r"No layer of model 'relu' was quantized.*"
                       r"needs at least one layer of a supported type \(.*Dense.*\) "
                       r"that `filters` selects"):
        mqk.quantize_model(no_kernel)


def test_filters_excluding_every_layer():
    with pytest.raises(ValueError, match=r"`filters` excluded them all.*filters=None "
                       r"selects every one"):
        _quantize(filters=lambda layer: False)


def test_filters_naming_a_missing_layer():
    with pytest.raises(ValueError, match=r"filters names layers that are not in model "
                       r"'cnn': \['c2'\]\. Known layers: \[.*'c1'.*'fc'"):
        _quantize(filters=["c1", "c2"])


def test_filters_of_the_wrong_type():
    # It used to fail with "TypeError: 'int' object is not iterable".
    with pytest.raises(ValueError, match=r"filters must be None, a callable `layer -> "
                       r"bool`, a layer name or a collection of layer names, got 3"):
        _quantize(filters=3)


def test_metaquant_model_around_a_float_model():
    with pytest.raises(ValueError, match=r"has no MetaQuantWrapper layer: nothing to "
                       r"quantize\. Use mq_keras\.quantize_model"):
        mqk.MetaQuantModel(_cnn())


# ------------------------------------------------------------------- training
def test_compile_without_meta_optimizer():
    with pytest.raises(ValueError, match=r"needs meta_optimizer= for the 'metaquant' "
                       r"estimator, e\.g\. meta_optimizer=mq_keras\.PaperAdam\(1e-3\)"):
        _quantize().compile(optimizer="sgd", loss=LOSS)


def test_fit_before_compile():
    x, y = _data()
    with pytest.raises(ValueError, match=r"must call `compile\(\)` before using the "
                       r"model"):
        _quantize().fit(x, y, verbose=0)


def test_paper_adam_amsgrad():
    with pytest.raises(ValueError, match=r"PaperAdam does not implement amsgrad"):
        mqk.PaperAdam(amsgrad=True)


# --------------------------------------------------------------------- export
def test_convert_unknown_mode(qmodel):
    with pytest.raises(ValueError, match=r"Unknown mode 'int4'; allowed modes are "
                       r"\('weights', 'int8', 'float'\)"):
        mqk.convert_to_tflite(qmodel, mode="int4")


def test_convert_int8_without_representative_dataset(qmodel):
    with pytest.raises(ValueError, match=r'mode="int8" needs representative_dataset= '
                       r"\(a few hundred training inputs\)"):
        mqk.convert_to_tflite(qmodel, mode="int8")


def test_convert_weights_with_representative_dataset(qmodel):
    with pytest.raises(ValueError, match=r"only used by mode='int8', not "
                       r"mode='weights'; drop it, or pass mode='int8'"):
        mqk.convert_to_tflite(qmodel, mode="weights", representative_dataset=_data()[0])


def test_convert_unknown_weight_dtype(qmodel):
    with pytest.raises(ValueError, match=r"Unknown weight_dtype 'int2'; allowed values "
                       r"are \('int8', 'int4'\) \(\"int8\": the default, float speed; "
                       r"\"int4\": smallest file"):
        mqk.convert_to_tflite(qmodel, weight_dtype="int2")


def test_convert_deprecated_weight_dtype_auto(qmodel):
    with pytest.warns(DeprecationWarning, match=r"weight_dtype='auto' is deprecated; "
                      r"it means 'int4'.*Pass weight_dtype='int4' to keep this file"):
        mqk.convert_to_tflite(qmodel, weight_dtype="auto")


def test_cli_unknown_weight_dtype(capsys, tmp_path):
    err = _cli_error(capsys, ["m.keras", "m.tflite", "--weight_dtype", "int2"])
    assert re.search(r"invalid choice: 'int2' \(choose from .*int8.*int4", err), err


@pytest.mark.parametrize("data,shape", [
    ([], r"\(0,\)"),
    (np.zeros((0, 8, 8, 1), "float32"), r"\(0, 8, 8, 1\)"),
    (np.zeros((8,), "float32"), r"\(8,\)"),
])
def test_convert_empty_representative_dataset(qmodel, data, shape):
    with pytest.raises(ValueError, match=rf"must be a non-empty batch of inputs \(got "
                       rf"shape {shape}\), a tf\.data\.Dataset or a generator factory"):
        mqk.convert_to_tflite(qmodel, mode="int8", representative_dataset=data)


def test_convert_representative_dataset_of_the_wrong_shape(qmodel):
    # It used to be reported as layers TFLite cannot convert.
    with pytest.raises(ValueError, match=r"examples of shape \(5, 5, 1\), but the "
                       r"model's input takes \(8, 8, 1\).*shaped \(num_examples,\) "
                       r"\+ \(8, 8, 1\)"):
        mqk.convert_to_tflite(qmodel, mode="int8",
                              representative_dataset=np.zeros((4, 5, 5, 1)))


def test_convert_non_finite_representative_dataset(qmodel):
    # It used to return a model without integer kernels ("int8" in name only).
    x = _data()[0]
    x[1, 2, 3, 0] = np.nan
    with pytest.raises(ValueError, match=r"contains NaN or infinite values; "
                       r"calibration needs finite example inputs"):
        mqk.convert_to_tflite(qmodel, mode="int8", representative_dataset=x)


def test_convert_representative_dataset_given_as_a_path(qmodel):
    with pytest.raises(ValueError, match=r"representative_dataset='x\.npy' looks like "
                       r"a file path; pass the examples themselves, e\.g\. "
                       r"representative_dataset=np\.load\(path\)"):
        mqk.convert_to_tflite(qmodel, mode="int8", representative_dataset="x.npy")


def test_convert_representative_dataset_given_as_a_generator_object(qmodel):
    def gen():
        yield [_data()[0][:1]]

    with pytest.raises(ValueError, match=r"is an iterator \(a generator object\?\).*"
                       r"pass the generator function itself \(representative_dataset="
                       r"gen, not gen\(\)\)"):
        mqk.convert_to_tflite(qmodel, mode="int8", representative_dataset=gen())


def test_convert_empty_tf_data_dataset(qmodel):
    # It used to return a model without integer kernels.
    empty = tf.data.Dataset.from_tensor_slices(np.zeros((0, 8, 8, 1), "float32"))
    with pytest.raises(ValueError, match=r"representative_dataset yielded no example; "
                       r"calibration needs some"):
        mqk.convert_to_tflite(qmodel, mode="int8", representative_dataset=empty.batch(2))


def test_convert_failing_representative_generator(qmodel):
    # It used to be reported as layers TFLite cannot convert.
    def gen():
        raise RuntimeError("no such directory: data/")
        yield

    with pytest.raises(ValueError, match=r"representative_dataset raised RuntimeError "
                       r"while the converter read it: no such directory: data/; it "
                       r"must yield lists of model inputs"):
        mqk.convert_to_tflite(qmodel, mode="int8", representative_dataset=gen)


def test_convert_or_strip_a_subclassed_model():
    with pytest.raises(ValueError, match=r"is a subclassed _Subclassed; only Functional "
                       r"and Sequential models \(or a MetaQuantModel\) can be stripped"):
        mqk.convert_to_tflite(_Subclassed())


def test_strip_a_float_model():
    with pytest.raises(ValueError, match=r"contains no MetaQuantWrapper: there is "
                       r"nothing to strip\. Quantize it with mq_keras\.quantize_model"):
        mqk.strip_model(_cnn())


def test_verify_tflite_given_a_path(qmodel):
    with pytest.raises(TypeError, match=r"tflite_bytes must be the bytes of a TFLite "
                       r"model \(what convert_to_tflite returns, or "
                       r"open\(path, 'rb'\)\.read\(\)\), got str 'model\.tflite'"):
        mqk.verify_tflite(qmodel, "model.tflite", _data()[0])


@pytest.mark.parametrize("call", [
    lambda blob: mqk.verify_tflite(None, blob, np.zeros((1, 8, 8, 1))),
    lambda blob: export.run_tflite(blob, np.zeros((1, 8, 8, 1))),
    lambda blob: tflite_weights.op_names(blob),
], ids=["verify_tflite", "run_tflite", "op_names"])
def test_bytes_that_are_not_a_tflite_model(call):
    # They used to fail with struct.error or "not a valid Flatbuffer buffer".
    with pytest.raises(ValueError, match=r"is not a TFLite model \(64 bytes without "
                       r"the 'TFL3' file identifier\); pass the bytes that "
                       r"convert_to_tflite returns"):
        call(b"PK\x03\x04" + bytes(60))


def test_verify_tflite_without_examples(qmodel, float_blob):
    with pytest.raises(ValueError, match=r"needs at least one input example; got x of "
                       r"shape \(0, 8, 8, 1\), pass a batch of model inputs"):
        mqk.verify_tflite(qmodel, float_blob, np.zeros((0, 8, 8, 1)))


def test_summary_of_something_else():
    # It used to fail with "AttributeError: 'str' object has no attribute 'name'".
    with pytest.raises(ValueError, match=r"summary expects a MetaQuantModel \(from "
                       r"mq_keras\.quantize_model\) or a keras\.Model containing "
                       r"MetaQuantWrapper layers, got str"):
        mqk.summary("model.keras")


# ------------------------------------------------------------------ export CLI
def _cli_error(capsys, argv):
    """Runs the export CLI in-process; returns its usage error message."""
    with pytest.raises(SystemExit) as info:
        export._main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_cli_input_that_is_not_a_keras_file(capsys, tmp_path):
    err = _cli_error(capsys, [str(tmp_path / "model.h5"), str(tmp_path / "m.tflite")])
    assert re.search(r"'.*model\.h5' is not a \.keras file; save the model with "
                     r"model\.save\('name\.keras'\)", err), err


def test_cli_missing_input(capsys, tmp_path):
    err = _cli_error(capsys, [str(tmp_path / "gone.keras"), str(tmp_path / "m.tflite")])
    assert re.search(r"'.*gone\.keras' does not exist or is not a file; pass the path "
                     r"of a saved \.keras model", err), err


def test_cli_int8_without_data(capsys, tmp_path):
    path = tmp_path / "m.keras"
    path.write_bytes(b"")  # refused before it is read
    err = _cli_error(capsys, [str(path), str(tmp_path / "m.tflite"), "--mode", "int8"])
    assert "--mode int8 needs --representative_data FILE.npy" in err, err


def test_cli_data_without_int8(capsys, tmp_path):
    path = tmp_path / "m.keras"
    path.write_bytes(b"")
    err = _cli_error(capsys, [str(path), str(tmp_path / "m.tflite"),
                              "--representative_data", "x.npy"])
    assert ("--representative_data is only used by --mode int8, not --mode "
            "weights; drop it or add --mode int8") in err, err


def test_cli_unknown_mode(capsys, tmp_path):
    err = _cli_error(capsys, ["m.keras", "m.tflite", "--mode", "int4"])
    assert re.search(r"invalid choice: 'int4' \(choose from .*weights.*int8.*float",
                     err), err


# ------------------------------------------ MetaQuantModel and meta networks
def test_metaquant_model_around_a_non_model():
    with pytest.raises(ValueError, match=r"MetaQuantModel expects a built Functional "
                       r"or Sequential keras\.Model.*got str.*quantize_model"):
        mqk.MetaQuantModel("model")


def test_meta_optimizer_for_the_ste_estimator():
    with pytest.raises(ValueError, match=r"meta_optimizer.*estimator='ste'.*drop "
                       r"meta_optimizer"):
        _quantize(estimator="ste").compile(
            optimizer="sgd", meta_optimizer=mqk.PaperAdam(), loss=LOSS)


def test_unknown_meta_optimizer():
    with pytest.raises(ValueError, match=r"meta_optimizer='nope'.*PaperAdam"):
        _quantize().compile(optimizer="sgd", meta_optimizer="nope", loss=LOSS)


def test_one_optimizer_instance_for_both_roles():
    opt = mqk.PaperAdam()
    with pytest.raises(ValueError, match=r"optimizer and meta_optimizer must be two "
                       r"different optimizer instances"):
        _quantize().compile(optimizer=opt, meta_optimizer=opt, loss=LOSS)


def test_bool_hidden_size():
    with pytest.raises(ValueError, match=r"hidden_size must be a positive int, got "
                       r"True"):
        meta_networks.get("fc_grad", hidden_size=True)


def test_infinite_max_gain():
    with pytest.raises(ValueError, match=r"max_gain must be a finite number > 1, got "
                       r"inf"):
        mqk.GainMLP(max_gain=float("inf"))


def test_string_max_gain():
    with pytest.raises(ValueError, match=r"max_gain must be a finite number > 1, got "
                       r"'4'"):
        mqk.GainMLP(max_gain="4")


def test_string_seed():
    with pytest.raises(ValueError, match=r"seed must be an int or None, got 'x'"):
        mqk.MultiFC(seed="x")


def test_unknown_option_to_meta_networks_get():
    with pytest.raises(ValueError, match=r"'hiden_size'.*MultiFC takes .*'hidden_size'"):
        meta_networks.get("multifc", hiden_size=3)


def test_unknown_multifc_activation():
    with pytest.raises(ValueError, match=r"activation='nope'.*keras\.activations"):
        mqk.MultiFC(activation="nope")
