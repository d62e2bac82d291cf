"""An empty Generate RPC that answers with a fixed response of a given size: the gRPC ceiling on this box.

    python bench/echo_server.py --images 1 --image-bytes 784
Prints one JSON line on stdout once serving, as the service does: {"event": "serving", "port": N}.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import grpc

from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc


class Echo(pb_grpc.GeneratorServicer):
    def __init__(self, response: pb.GenerateResponse):
        self.response = response

    async def Generate(self, request, context):
        return self.response


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--image-bytes", type=int, default=784)
    args = p.parse_args()
    response = pb.GenerateResponse(
        model="echo", version=1, format=pb.RAW_UINT8, image_shape=[28, 28, 1],
        images=[bytes(args.image_bytes)] * args.images,
    )  # fmt: skip
    server = grpc.aio.server()
    pb_grpc.add_GeneratorServicer_to_server(Echo(response), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"event": "serving", "port": port}), flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
