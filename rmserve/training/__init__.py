"""Training: preference data, Bradley-Terry trainer, evaluation, ONNX export (extra train)."""
