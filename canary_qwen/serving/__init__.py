"""Triton serving: the model repository generator (onnx and trt flavours), its python models, the bundled server."""
