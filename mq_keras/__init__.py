"""mq_keras: MetaQuant quantization-aware training for Keras 3.

Wrap a Keras model with `quantize_model`, train it with `fit`; the quantizer's
gradient is learned by a small meta network (Chen, Wang & Pan, NeurIPS 2019).
"""

from mq_keras import ewgs, gradients, meta_networks, quantizers
from mq_keras.activation_quantizers import ActivationQuantizer
from mq_keras.export import convert_to_tflite, strip_model, verify_tflite
from mq_keras.layers import MetaQuantWrapper
from mq_keras.meta_networks import FCGrad, GainMLP, LSTMFC, MetaEWGS, MetaNetwork, MultiFC
from mq_keras.models import MetaQuantModel
from mq_keras.optimizers import PaperAdam
from mq_keras.quantizers import BWN, DoReFa, Quantizer, Ternary, Uniform
from mq_keras.requantization import file_rounding
from mq_keras.summary import summary
from mq_keras.wrap import quantize_model

__version__ = "0.1.0"

__all__ = [
    "ActivationQuantizer", "BWN", "DoReFa", "FCGrad", "GainMLP", "LSTMFC", "MetaEWGS",
    "MetaNetwork",
    "MetaQuantModel", "MetaQuantWrapper", "MultiFC", "PaperAdam", "Quantizer",
    "Ternary", "Uniform", "convert_to_tflite", "ewgs", "file_rounding", "gradients",
    "meta_networks",
    "quantize_model", "quantizers", "strip_model", "summary", "verify_tflite",
]
