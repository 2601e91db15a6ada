"""Release: export to ONNX, int8, ensembles, model cards, the drift reference, the ship rule."""
