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


def method(float_head: int = FLOAT_HEAD_CONVS, members: int = 1) -> str:
    """How an int8 copy was made, in the words its card uses."""
    each = " of each member" if members > 1 else ""
    return (f"static QDQ, uint8 activations, 7-bit per-channel int8 weights, {CALIB_PERCENTILE}th percentile calibration "
            f"on {calibration_images(CALIB_IMAGES, members)} training images; first {float_head} and last {FLOAT_TAIL_CONVS} "
            f"convolutions{each} and the classifier in float")


def calibration_images(max_images: int, members: int = 1) -> int:
    """Percentile calibration keeps every activation of every image in memory (500 images of one Lite0 did not
    fit in 24 GB), so an ensemble of n members is calibrated on 1/n as many images."""
    return max(1, max_images // max(1, members))


def check_float_head(float_head: int) -> None:
    if float_head < 0:
        raise ValueError(f"the number of float convolutions must be >= 0, not {float_head}")


def float_nodes(model_path: Path, float_head: int = FLOAT_HEAD_CONVS) -> list[str]:
    """Names of the nodes kept in float: the first ``float_head`` and last convolutions and every Gemm/MatMul.

    The right ``float_head`` depends on the architecture and even on the training recipe (see above): choose it
    on validation agreement with fp32 for a new model."""
    import onnx

    from .ensemble import member_of

    check_float_head(float_head)
    graph = onnx.load(str(model_path), load_external_data=False).graph
    keep = [n.name for n in graph.node if n.op_type in KEEP_FLOAT_OPS]
    members: dict[str, list[str]] = {}  # an ensemble's members each keep their own first and last layers
    for n in graph.node:
        if n.op_type == "Conv":
            members.setdefault(member_of(n.name), []).append(n.name)
    for convs in members.values():
        keep += convs[:float_head] + convs[-FLOAT_TAIL_CONVS:]
    return sorted(set(keep))


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

    from .ensemble import FLOAT16_SUFFIX, ensemble_members, restore_float32

    clf = Classifier(model_path)
    src = onnx.load(str(model_path))
    input_name = src.graph.input[0].name
    n_images = calibration_images(max_images, ensemble_members(src))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib_paths[:n_images])

        def get_next(self):
            for p in self.it:
                return {input_name: clf.preprocess(decode(p))[None]}
            return None

    out_path = Path(out_path)
    pre = out_path.with_suffix(".pre.onnx")
    unpacked = out_path.with_suffix(".fp32.onnx")
    try:
        if any(i.name.endswith(FLOAT16_SUFFIX) for i in src.graph.initializer):
            # weights stored as float16 (an ensemble): the quantizer needs them as float32 initializers
            onnx.save(restore_float32(src), str(unpacked))
            model_path = unpacked
        quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True,
                        calibrate_method=CalibrationMethod.Percentile,
                        extra_options={"CalibPercentile": CALIB_PERCENTILE},
                        nodes_to_exclude=float_nodes(pre, float_head))
    finally:
        pre.unlink(missing_ok=True)
        unpacked.unlink(missing_ok=True)
    return out_path
