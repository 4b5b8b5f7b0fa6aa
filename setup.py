"""Packaging of mq_keras: MetaQuant quantization-aware training for Keras 3."""

import pathlib
import re

from setuptools import setup

_HERE = pathlib.Path(__file__).resolve().parent
_VERSION = re.search(
    r'^__version__ = "([^"]+)"',
    (_HERE / "mq_keras" / "__init__.py").read_text(),
    re.MULTILINE,
).group(1)

# tensorflow-datasets 4.9.10 imports importlib_resources without declaring it.
_DATA = ["tensorflow-datasets", "importlib_resources"]

setup(
    name="mq-keras",
    version=_VERSION,
    description=(
        "MetaQuant (NeurIPS 2019) quantization-aware training for Keras 3 "
        "on the TensorFlow backend, with TFLite export."
    ),
    long_description=(_HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=["mq_keras"],
    python_requires=">=3.10",
    install_requires=["tensorflow>=2.16", "keras>=3.5", "numpy"],
    extras_require={
        # matplotlib: the benchmark's PNG plots (training curves, meta function).
        "examples": _DATA + ["absl-py", "matplotlib"],
        # ai-edge-litert is the LiteRT runtime phones use; with it installed,
        # export checks run the .tflite files in that interpreter.
        "litert": ["ai-edge-litert"],
        "tests": ["pytest", "hypothesis", "ai-edge-litert"] + _DATA + ["absl-py"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
