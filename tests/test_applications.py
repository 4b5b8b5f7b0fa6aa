"""examples/applications.py on a fast subset of the keras.applications zoo.

One family, at its smallest input, through the script's own per-family
function: wrap, train (MetaQuant, side by side with the float model), save and
load `.keras`, export in weights mode and compare with Keras. The whole table
(every family, int8 too) is the script's run in the README.
"""

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT / "examples") not in sys.path:
    sys.path.insert(0, str(ROOT / "examples"))

import applications  # noqa: E402  (defines no absl flags on import)


@pytest.mark.parametrize("name", ["MobileNetV3Small"])
def test_family_row(name, tmp_path):
    row = applications.run_family(
        name, num_bits=4, train_steps=1, batch_size=4, rounds=2,
        eval_samples=8, representative_samples=4, modes=("weights",),
        data="random", work_dir=tmp_path, log=lambda s: None)
    assert row["errors"] == [], row["errors"]
    assert row["input"] == "32x32"
    assert row["kernels_quantized"] == row["kernels"] > 50
    assert row["quantized_fraction"] >= 0.95
    assert row["keras_round_trip"] is True
    assert row["keras_round_trip_max_abs_diff"] == 0.0
    weights = row["tflite"]["weights"]
    assert weights["top1_agreement"] == 1.0
    assert weights["max_rel_diff"] < 1e-4
    assert weights["flex_ops"] == []
    assert row["step_s"]["float"] > 0 and row["step_s"]["quantized"] > 0
    assert row["step_ratio"] == pytest.approx(
        row["step_s"]["quantized"] / row["step_s"]["float"])
    assert row["batchnorm_recalibrated"] > 0
    assert "RANDOM" in row["data"]
    assert list(tmp_path.iterdir()) == []  # the .keras file was removed


def test_failing_stage_goes_in_the_row(monkeypatch):
    """A family that fails gets its row with the error, the script goes on."""
    def broken(fam):
        raise RuntimeError("no such model\nsecond line")

    monkeypatch.setattr(applications, "build_float", broken)
    row = applications.run_family("VGG16", data="random", eval_samples=2,
                                  log=lambda s: None)
    assert row["errors"] == ["build: RuntimeError: no such model"]
    assert row["tflite"] == {} and "kernels" not in row
    table = applications.format_table([row])
    assert "| VGG16 | 32x32 | - |" in table
    assert "build: RuntimeError: no such model |" in table


def test_families_and_inputs():
    names = applications.FAMILY_NAMES
    for required in ("MobileNetV2", "MobileNetV3Small", "MobileNetV3Large",
                     "EfficientNetB0", "EfficientNetV2B0", "ResNet50",
                     "ResNet50V2", "DenseNet121", "NASNetMobile",
                     "ConvNeXtTiny", "Xception", "InceptionV3", "VGG16"):
        assert required in names
    assert applications.family("inceptionv3").size == 75
    assert applications.family("Xception").size == 71
    with pytest.raises(ValueError, match="Unknown family 'ResNet9'"):
        applications.family("ResNet9")
    assert applications.error_text(ValueError("a\nb")) == "ValueError: a"
    assert applications.error_text(KeyError()) == "KeyError"


def test_skipped_steps_are_an_error(monkeypatch):
    """Steps MetaQuantModel skips (non-finite loss) fail the train stage."""
    import keras

    def overflowing(fam):
        inputs = keras.Input((fam.size, fam.size, 3))
        x = keras.layers.Conv2D(4, 3)(inputs)
        x = keras.layers.Dense(10)(keras.layers.Flatten()(x))
        return keras.Model(inputs, keras.layers.Rescaling(1e38)(x))

    monkeypatch.setattr(applications, "build_float", overflowing)
    row = applications.run_family(
        "VGG16", train_steps=1, batch_size=2, rounds=2, eval_samples=2,
        representative_samples=2, modes=(), data="random",
        log=lambda s: None)
    assert row["skipped_steps"] == 2
    assert len(row["errors"]) == 1, row["errors"]
    assert row["errors"][0].startswith(
        "train: FloatingPointError: 2 of 2 quantized training steps skipped: "
        "non-finite loss or gradients (DoReFa kernels lie in [-1, 1]")
    assert "--quantizer=uniform" in row["errors"][0]
    assert row["keras_round_trip"] is True  # later stages still ran
