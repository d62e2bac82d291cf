"""The front ends, side by side: each translates one wire format into the data plane's domain requests and back,
and none imports another. ganserve.v1's Generator (ganserve) and ModelAdmin (admin); the Open Inference Protocol's
semantics (oip), over gRPC (oip_grpc) and over REST (oip_rest); the PNG routes and the playground (pages); and the
text people write for seeds, labels and versions (text), shared by the PNG routes, OIP parameters and the client.
"""
