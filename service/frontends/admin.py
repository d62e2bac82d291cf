"""The ganserve.v1 ModelAdmin front end: protobuf → the registry's lifecycle calls → protobuf."""

from __future__ import annotations

from collections.abc import Sequence

from service import domain as dm
from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from service.errors import Disabled
from service.registry import Registry

STATES = {name: pb.VersionState.Value(f"VERSION_STATE_{name}") for name in
          ("AVAILABLE", "LOADING", "READY", "UNLOADING", "FAILED")}  # fmt: skip


def from_statuses(statuses: Sequence[dm.VersionStatus]) -> list[pb.VersionStatus]:
    return [pb.VersionStatus(name=s.name, version=s.version, state=STATES[s.state], reason=s.reason) for s in statuses]


class ModelAdminServicer(pb_grpc.ModelAdminServicer):
    def __init__(self, registry: Registry):
        self.registry = registry

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context) -> pb.RepositoryIndexResponse:
        statuses = [s for s in self.registry.status() if s.state == "READY" or not request.ready_only]
        return pb.RepositoryIndexResponse(versions=from_statuses(statuses))

    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.ModelStatus:
        statuses = await self.registry.load_model(request.name, request.version)
        return pb.ModelStatus(name=request.name, versions=from_statuses(statuses))

    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.ModelStatus:
        statuses = await self.registry.unload_model(request.name, request.version)
        return pb.ModelStatus(name=request.name, versions=from_statuses(statuses))


class AdminOff(pb_grpc.ModelAdminServicer):
    """ModelAdmin where it is off: every call answers UNIMPLEMENTED with why and how to turn it on, rather than
    gRPC's bare "Method not found!"."""

    def __init__(self, why: str):
        self.why = why

    async def RepositoryIndex(self, request, context):
        raise Disabled(f"ganserve.v1.ModelAdmin is off on this server: {self.why}")

    LoadModel = UnloadModel = RepositoryIndex
