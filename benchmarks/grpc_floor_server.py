"""The transport floor of p1_cheap: a grpc.aio server that receives a request's bytes and
answers 2 bytes, doing nothing else (no parsing, no interceptors, no batching).

    python benchmarks/grpc_floor_server.py      # prints its port, serves until killed

Whatever a gRPC reward server does, a request cannot cost less than this round trip of the
same bytes on the same machine; ``bench_serving.run_cheap`` measures it beside p1_cheap.
"""

from __future__ import annotations

import asyncio

import grpc

METHOD = "/dancegrpo.bench.Floor/Receive"


async def _receive(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"ok"


async def main() -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 1 << 30)])
    service, method = METHOD.strip("/").split("/")
    handler = grpc.unary_unary_rpc_method_handler(_receive)  # bytes in, bytes out
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(service, {method: handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
