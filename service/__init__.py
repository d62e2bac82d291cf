"""The gRPC generator service. Serves ONNX generators from the model repository; never imports torch."""
