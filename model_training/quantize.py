"""Static int8 quantization (QDQ) of an exported model, calibrated on real X-rays."""

from __future__ import annotations

from pathlib import Path


def quantize_model(model_path: Path, out_path: Path, calib_paths: list[str], max_images: int = 200) -> Path:
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from uplink_server.imaging import decode
    from uplink_server.model import Classifier

    clf = Classifier(model_path)
    input_name = ort.InferenceSession(str(model_path)).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib_paths[:max_images])

        def get_next(self):
            for p in self.it:
                return {input_name: clf.preprocess(decode(p))[None]}
            return None

    pre = Path(out_path).with_suffix(".pre.onnx")
    quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    pre.unlink(missing_ok=True)
    return Path(out_path)
