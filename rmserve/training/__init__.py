"""Training: preference data, Bradley-Terry trainer, evaluation and ONNX export (extra ``train``)."""
