"""`python -m service`: the gRPC server is the next milestone; until it lands, say so plainly."""

import sys

print(
    "The gRPC generator service is not built yet. The model it will serve is ready:\n"
    "  models/mnist-cdcgan/1/model.onnx (conditional MNIST generator, ONNX; see README.md).",
    file=sys.stderr,
)
sys.exit(1)
