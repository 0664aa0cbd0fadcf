"""The scoring service: FastAPI + uvicorn over ONNX Runtime (extra ``serve``)."""
