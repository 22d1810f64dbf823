"""gRPC server reflection, ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``.

grpcio-reflection implements only v1alpha; grpcurl and newer tools ask v1 first. The two
protocols differ only in their package name (grpc/grpc-proto ``grpc/reflection/v1`` and
``v1alpha/reflection.proto`` define the same messages with the same field numbers), so one
servicer answers both: the v1 method decodes and encodes with the v1alpha message classes,
whose wire format is identical.

Reflection answers from its own descriptor pool holding the served services, their
dependencies, both reflection files and the ``google.rpc`` error details the server sends
(so grpcurl can print ``BadRequest``/``RetryInfo``); the process-wide pool is left alone.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from google.rpc import error_details_pb2, status_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA_SERVICE = reflection.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
_V1ALPHA_PACKAGE = "grpc.reflection.v1alpha"
_V1_PACKAGE = "grpc.reflection.v1"


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """``grpc/reflection/v1/reflection.proto``: the v1alpha file under the v1 package."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = _V1_PACKAGE
    proto.options.ClearField("deprecated")
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    old, new = f".{_V1ALPHA_PACKAGE}.", f".{_V1_PACKAGE}."

    def rename(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
        for message in messages:
            for field in message.field:
                if field.type_name.startswith(old):
                    field.type_name = new + field.type_name[len(old) :]
            rename(message.nested_type)

    rename(proto.message_type)
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old) :]
            method.output_type = new + method.output_type[len(old) :]
    return proto


def reflection_pool(service_names: Iterable[str]) -> descriptor_pool.DescriptorPool:
    """A pool with the files of ``service_names`` (from the default pool), their
    dependencies, both reflection files and ``google.rpc`` status and error details."""
    default = descriptor_pool.Default()
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
        added.add(file.name)

    for name in service_names:
        add(default.FindServiceByName(name).file)
    add(reflection_pb2.DESCRIPTOR)
    add(status_pb2.DESCRIPTOR)
    add(error_details_pb2.DESCRIPTOR)
    pool.Add(_v1_file())
    return pool


def add_reflection(registrar, service_names: Iterable[str]) -> None:
    """Serves reflection v1 and v1alpha for ``service_names`` (plus both reflection services).

    ``registrar`` is a ``grpc.aio.Server`` or anything with its two registration methods
    (e.g. ``SafeRegistrar``).
    """
    served = tuple(service_names)
    listed = (*served, V1ALPHA_SERVICE, V1_SERVICE)
    servicer = reflection.aio.ReflectionServicer(listed, pool=reflection_pool(served))
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    for service in (V1ALPHA_SERVICE, V1_SERVICE):
        registrar.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, handlers),)
        )
        registrar.add_registered_method_handlers(service, handlers)
