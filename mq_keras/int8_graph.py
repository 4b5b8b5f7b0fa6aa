"""Full-integer export from trained activation ranges: what to check before and after.

A model trained with `ActivationQuantizer`s carries every activation range in
its graph, so `convert_to_tflite(mode="int8")` needs no representative
dataset, and the file's scales are the trained ranges. Two things can still
go wrong, and both are refused rather than shipped: options that contradict
trained ranges (a calibration dataset that would be ignored, integer input
and output on a model without ranges), and an op left in float because no
quantizer sat on one of its tensors (a nested model's internals, an op
whose inputs need one range, like LOGISTIC's fixed output scale).
"""

from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

from mq_keras.activation_quantizers import ActivationQuantizer
from mq_keras.kernels import sublayers

IO_DTYPES = ("float32", "int8", "uint8")
# Ops that legitimately touch float tensors in a full-integer file: the
# conversions at the float input/output, and shape arithmetic.
_FLOAT_OK = {"QUANTIZE", "DEQUANTIZE", "SHAPE", "STRIDED_SLICE", "PACK", "RESHAPE"}


def has_activation_ranges(model):
    """True if `model` holds `ActivationQuantizer`s (trained activation ranges)."""
    return any(isinstance(l, ActivationQuantizer) for l in sublayers(model))


def check_int8_options(mode, trained, representative_dataset, io_dtype):
    """Refuses option combinations that contradict how ranges are obtained."""
    if io_dtype not in IO_DTYPES:
        raise ValueError(f"Unknown io_dtype {io_dtype!r}; allowed values are {IO_DTYPES}.")
    if io_dtype != "float32" and not (mode == "int8" and trained):
        raise ValueError(
            f"io_dtype={io_dtype!r} needs mode='int8' on a model trained with "
            "activation quantizers (quantize_model(..., activation_quantizer='ema')), "
            "whose input and output ranges are known; this model has "
            + ("none." if not trained else f"them, but mode={mode!r}.")
        )
    if mode == "int8" and trained and representative_dataset is not None:
        raise ValueError(
            "This model was trained with activation quantizers: its int8 ranges "
            "are the trained ones, and representative_dataset= would be "
            "ignored. Drop representative_dataset."
        )


def float_ops(flatbuffer):
    """Names of ops that read or write a float32 tensor (besides I/O conversions)."""
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    found = []
    for sg in model.subgraphs:
        for op in sg.operators:
            code = model.operatorCodes[op.opcodeIndex]
            name = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")
            if name in _FLOAT_OK:
                continue
            tensors = [sg.tensors[i] for i in list(op.inputs) + list(op.outputs) if i >= 0]
            if any(t.type == schema.TensorType.FLOAT32 for t in tensors):
                found.append(name)
    return found


def check_all_integer(flatbuffer):
    """Raises if the converted file runs any op in float."""
    left = float_ops(flatbuffer)
    if left:
        raise ValueError(
            f"The int8 file still computes {sorted(set(left))} in float: some "
            "tensor had no trained range (a nested model's internals, or an op "
            "TFLite quantizes with a fixed scale such as sigmoid/tanh). Quantize "
            "a flat Functional model, or use mode='weights'."
        )
