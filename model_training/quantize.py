"""Static int8 quantization (QDQ) of an exported model, calibrated on real X-rays.

What matters, measured on model 1.2.0 (BENCHMARKS.md has the table):

- 7-bit weights (``reduce_range``). ONNX Runtime's fast uint8 x int8 kernels use AVX2's VPMADDUBSW,
  whose 16-bit sums saturate on CPUs without VNNI (this one): full 8-bit weights lost 21 / 14
  accuracy points. uint8 weights avoid that too, but run 2.5-5x slower than fp32 here.
- The first and last layers in float (``FLOAT_HEAD_CONVS`` / ``FLOAT_TAIL_CONVS`` and the classifier):
  the error grows through the early high-resolution blocks and the last ones feed the logits and the
  heatmap directly. Model 1.4.0 (trained with zoom-in augmentation) needed 13 float convolutions at
  the start where 1.3.0 needed 7: agreement with fp32 on validation 99.6 % against 98.9 %.
- Percentile (99.99) calibration instead of MinMax: a few extreme activations otherwise stretch the
  uint8 range. Chosen by agreement with fp32 on the validation split.
"""

from __future__ import annotations

from pathlib import Path

KEEP_FLOAT_OPS = ("Gemm", "MatMul")
FLOAT_HEAD_CONVS = 13  # EfficientNet-Lite0: the stem and the blocks down to the first at 28 x 28
FLOAT_TAIL_CONVS = 3  # the last block and the head convolution (also the heatmap's features)
CALIB_PERCENTILE = 99.99
CALIB_IMAGES = 200


def method(float_head: int = FLOAT_HEAD_CONVS) -> str:
    """How an int8 copy was made, in the words its card uses."""
    return (f"static QDQ, uint8 activations, 7-bit per-channel int8 weights, {CALIB_PERCENTILE}th percentile calibration "
            f"on {CALIB_IMAGES} training images; first {float_head} and last {FLOAT_TAIL_CONVS} convolutions and "
            "the classifier in float")


def check_float_head(float_head: int) -> None:
    if float_head < 0:
        raise ValueError(f"the number of float convolutions must be >= 0, not {float_head}")


def float_nodes(model_path: Path, float_head: int = FLOAT_HEAD_CONVS) -> list[str]:
    """Names of the nodes kept in float: the first ``float_head`` and last convolutions and every Gemm/MatMul.

    The right ``float_head`` depends on the architecture and even on the training recipe (see above): choose it
    on validation agreement with fp32 for a new model."""
    import onnx

    check_float_head(float_head)
    graph = onnx.load(str(model_path), load_external_data=False).graph
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    keep = [n.name for n in graph.node if n.op_type in KEEP_FLOAT_OPS]
    return sorted(set(convs[:float_head] + convs[-FLOAT_TAIL_CONVS:] + keep))


def quantize_model(model_path: Path, out_path: Path, calib_paths: list[str], max_images: int = CALIB_IMAGES,
                   float_head: int = FLOAT_HEAD_CONVS) -> Path:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from uplink_server.imaging import decode
    from uplink_server.model import Classifier

    clf = Classifier(model_path)
    input_name = onnx.load(str(model_path), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib_paths[:max_images])

        def get_next(self):
            for p in self.it:
                return {input_name: clf.preprocess(decode(p))[None]}
            return None

    out_path = Path(out_path)
    pre = out_path.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True,
                        calibrate_method=CalibrationMethod.Percentile,
                        extra_options={"CalibPercentile": CALIB_PERCENTILE},
                        nodes_to_exclude=float_nodes(pre, float_head))
    finally:
        pre.unlink(missing_ok=True)
    return out_path
