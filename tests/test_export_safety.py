"""No file that crashes a phone: the checks `convert_to_tflite` runs (issue 10).

An untrained DenseNet121 quantized to 2 bits overflows float32; its int8 file
had infinite activation scales and the interpreter segfaulted in
`allocate_tensors`. These tests craft the same failures on a tiny model.
"""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

import mq_keras
from mq_keras import export, export_checks, tflite_weights
from tiny_models import tiny_cnn


def _data(n=32):
    return np.random.default_rng(0).random((n, 8, 8, 1), np.float32)


@pytest.fixture(scope="module")
def qmodel():
    return mq_keras.quantize_model(tiny_cnn(), num_bits=2, verbose=False)


@pytest.fixture(scope="module")
def int8_blob(qmodel):
    return mq_keras.convert_to_tflite(qmodel, mode="int8",
                                      representative_dataset=_data())


def _overflowing_model():
    """tiny_cnn at 2 bits whose BatchNorm scales by 1e38: Inf, then NaN."""
    q = mq_keras.quantize_model(tiny_cnn(), num_bits=2, verbose=False)
    bn = q.quantized_model.get_layer("bn")
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([np.full_like(gamma, 1e38), beta, mean, var])
    return q


def _corrupt(blob, tensor_name, *, scale=None, zero_point=None):
    """`blob` with one tensor's quantization scale or zero point replaced."""
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(blob))
    tensors = [t for sg in model.subgraphs for t in sg.tensors
               if t.name.decode() == tensor_name]
    assert tensors, tensor_name
    q = tensors[0].quantization
    if scale is not None:
        q.scale = np.full(len(q.scale), scale, np.float32)
    if zero_point is not None:
        q.zeroPoint = np.full(len(q.zeroPoint), zero_point, np.int64)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _input_quantize_tensor(blob):
    """Name of the int8 tensor the input QUANTIZE op writes."""
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(blob))
    sg = model.subgraphs[0]
    for op in sg.operators:
        code = model.operatorCodes[op.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) == \
                schema.BuiltinOperator.QUANTIZE:
            return sg.tensors[op.outputs[0]].name.decode()
    raise AssertionError("no QUANTIZE op")


@pytest.mark.parametrize("mode", ["weights", "int8", "float"])
def test_normal_export_still_returns_a_runnable_file(qmodel, mode):
    kwargs = {"representative_dataset": _data()} if mode == "int8" else {}
    blob = mq_keras.convert_to_tflite(qmodel, mode=mode, **kwargs)
    assert export_checks.quantization_problems(blob) == []
    out = export.run_tflite(blob, _data(4))
    assert out.shape == (4, 3) and np.all(np.isfinite(out))


def test_nonfinite_activations_refused_before_conversion(monkeypatch):
    q = _overflowing_model()

    def no_conversion(*args, **kwargs):
        raise AssertionError("the converter ran")

    monkeypatch.setattr(tf.lite.TFLiteConverter, "from_saved_model", no_conversion)
    with pytest.raises(ValueError, match=(
            r"Model 'cnn' computes NaN or Inf on representative_dataset example "
            r"0 \(its inputs are finite\); the first layer whose output is "
            r"non-finite is bn \(BatchNormalization\)\. A full-integer model "
            r"calibrated on it would get infinite quantization scales and crash "
            r"the TFLite interpreter.*train the model first")):
        mq_keras.convert_to_tflite(q, mode="int8", representative_dataset=_data())


def test_check_activations_names_the_example():
    q = _overflowing_model()
    stripped = mq_keras.strip_model(q)
    x = np.zeros((70, 8, 8, 1), np.float32)  # all-zero inputs stay finite
    x[67] = _data(1)[0]

    def rows():
        for row in x:
            yield [row[None]]

    with pytest.raises(ValueError, match=r"example 67 .*is bn \(BatchNorm"):
        export_checks.check_activations(stripped, rows)


@pytest.mark.parametrize("change,problem", [
    ({"scale": np.inf}, r"non-finite scale inf"),
    ({"scale": np.nan}, r"non-finite scale nan"),
    ({"scale": 0.0}, r"scale 0\.0 \(scales must be positive\)"),
    ({"zero_point": 200}, r"zero point 200 outside \[-128, 127\] for INT8"),
])
def test_invalid_quantization_parameters_are_found(int8_blob, change, problem):
    name = _input_quantize_tensor(int8_blob)
    bad = _corrupt(int8_blob, name, **change)
    assert export_checks.quantization_problems(int8_blob) == []
    (found,) = export_checks.quantization_problems(bad)
    assert found.startswith(name + ": ")
    with pytest.raises(ValueError, match=(
            r"(?s)The TFLite converter produced an unusable file: 1 quantized "
            r"tensor\(s\) have invalid parameters.*" + problem)):
        export_checks.check_quantization(bad)


def test_convert_refuses_a_file_with_infinite_scales(qmodel, monkeypatch):
    # What calibration on overflowing activations gives: stand it in for the
    # converter's output, as the DenseNet121 model's activations are slow to make.
    regrid = tflite_weights.regrid_int8_filters

    def infinite_scales(full, flat):
        blob, changed = regrid(full, flat)
        return _corrupt(blob, _input_quantize_tensor(blob), scale=np.inf), changed

    monkeypatch.setattr(tflite_weights, "regrid_int8_filters", infinite_scales)
    with pytest.raises(ValueError, match=r"(?s)unusable file.*tfl.quantize: non-finite scale inf"):
        mq_keras.convert_to_tflite(qmodel, mode="int8",
                                   representative_dataset=_data())


def test_interpreter_crash_becomes_an_error(int8_blob):
    # An infinite scale on the input QUANTIZE op segfaults in allocate_tensors
    # (XNNPACK, TF 2.21 / LiteRT); the child dies, this process does not.
    bad = _corrupt(int8_blob, _input_quantize_tensor(int8_blob), scale=np.inf)
    export_checks.check_interpreter(int8_blob)
    with pytest.raises(ValueError, match=(
            r"(?s)unusable file: a child process that loaded it (was killed by "
            r"SIGSEGV|got an error from the interpreter) in "
            r"allocate_tensors/invoke.*mode=\"weights\"")):
        export_checks.check_interpreter(bad)


def test_cli_reports_a_refused_model_without_traceback(tmp_path, capsys):
    model_path, data_path = tmp_path / "m.keras", tmp_path / "x.npy"
    out = tmp_path / "m.tflite"
    _overflowing_model().save(model_path)
    np.save(data_path, _data())
    with pytest.raises(SystemExit) as info:
        export._main([str(model_path), str(out), "--mode", "int8",
                      "--representative_data", str(data_path)])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m mq_keras.export: error: Model 'cnn' "
                          "computes NaN or Inf"), err
    assert "Traceback" not in err
    assert not out.exists()
