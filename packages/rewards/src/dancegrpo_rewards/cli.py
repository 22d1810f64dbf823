"""The ``dancegrpo-rewards`` command line: ``serve``, ``list`` and ``check``.

    dancegrpo-rewards serve --config services/demo.yaml [--port N] [--metrics-port N]
                            [--port-file FILE]
    dancegrpo-rewards list --target HOST:PORT [--token-env VAR] [--tls-ca FILE]
    dancegrpo-rewards check --config FILE [--no-file-check]   (also: each kind's extra installed)

``serve`` prints a banner line to stdout once every reward is ready, e.g.
``dancegrpo-rewards: SERVING on 127.0.0.1:50051 | metrics http://127.0.0.1:9464/metrics |
rewards: color_match(color_match)``; ``--port 0`` binds a free port and ``--port-file``
receives ``{"port": ..., "metrics_port": ..., "pid": ...}`` (written atomically) as soon as
the ports are bound. Exit codes: 0 after a clean shutdown (within ``drain_s +
grace_period_s`` of SIGTERM, even when a batch runs longer), 2 for config errors, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dancegrpo_proto.allocator import tune_malloc
from dancegrpo_rewards.base import RewardConfigError
from dancegrpo_rewards.config import ServiceConfig, load_config
from dancegrpo_rewards.logs import configure_logging

log = logging.getLogger("dancegrpo_rewards.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dancegrpo-rewards", description="Reward models as dynamic-batching gRPC services."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the rewards of a YAML config")
    serve.add_argument("--config", required=True, help="service YAML (see docs/serving.md)")
    serve.add_argument("--port", type=int, help="gRPC port (overrides server.port; 0 = free port)")
    serve.add_argument(
        "--metrics-port", type=int, help="Prometheus port (overrides server.metrics_port; 0 = free)"
    )
    serve.add_argument("--no-metrics", action="store_true", help="disable the metrics exporter")
    serve.add_argument("--host", help="bind address (overrides server.host)")
    serve.add_argument("--port-file", help="write the bound ports as JSON to this file")
    listing = sub.add_parser("list", help="list the rewards a running server hosts")
    listing.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of a server")
    listing.add_argument("--token-env", help="env variable holding a bearer token")
    listing.add_argument("--tls-ca", help="PEM root certificate (enables TLS)")
    listing.add_argument("--timeout", type=float, default=10.0, help="seconds")
    check = sub.add_parser("check", help="validate a config without serving")
    check.add_argument("--config", required=True)
    check.add_argument(
        "--no-file-check", action="store_true", help="skip checking that checkpoint files exist"
    )
    return parser


def _write_port_file(path: str, payload: dict[str, object]) -> None:
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, target)


async def _serve(config: ServiceConfig, args: argparse.Namespace) -> int:
    from dancegrpo_rewards.server import RewardServer, install_signal_handlers

    server = RewardServer(config)
    stop = asyncio.Event()
    install_signal_handlers(stop)
    metrics_port = -1 if args.metrics_port is None else args.metrics_port
    if args.no_metrics:
        metrics_port = None
    start = asyncio.create_task(server.start(port=args.port, metrics_port=metrics_port))
    # Publish the ports as soon as they are bound, while rewards may still be loading.
    while server.address is None and not start.done() and not stop.is_set():
        await asyncio.sleep(0.01)
    if server.address is not None and args.port_file:
        _write_port_file(
            args.port_file,
            {
                "port": server.address.port,
                "metrics_port": server.address.metrics_port,
                "pid": os.getpid(),
            },
        )
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({start, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if start in done:
        start.result()  # start-up errors propagate
        address = server.address
        rewards = ", ".join(f"{n}({h.spec.kind})" for n, h in server.hosted.items())
        metrics = address.metrics_url or "disabled"
        print(
            f"dancegrpo-rewards: SERVING on {address.target} | metrics {metrics} | "
            f"rewards: {rewards}",
            flush=True,
        )
        await stop.wait()
    else:
        start.cancel()
    if not await server.shutdown():
        # A score() or load() outlived the grace period on a worker thread. Python would join
        # that thread at exit (unbounded); the grace period is the promise, so leave now.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _list(args: argparse.Namespace) -> int:
    from dancegrpo_proto import RewardClient
    from dancegrpo_proto.v1 import rewards_pb2 as pb

    token = os.environ.get(args.token_env, "") if args.token_env else None
    root = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    with RewardClient(args.target, token=token, root_certificates=root, timeout=args.timeout) as c:
        for info in c.list_rewards():
            groups = ""
            if info.scoring_scope == pb.SCORING_SCOPE_GROUP:  # requests need group_sizes
                groups = f"\tgroup-wise groups={info.min_group_size}..{info.max_group_size}"
            print(
                f"{info.name}\tkind={info.kind}\tversion={info.version}\t"
                f"outputs={','.join(info.output_names)}\tmax_batch_size={info.max_batch_size}"
                f"{groups}"
            )
    return 0


def _check_dependencies(config: ServiceConfig) -> None:
    """Raises when a configured kind's extra is not installed (looks modules up only)."""
    from dancegrpo_rewards.registry import kinds_in_options, missing_dependencies

    for name, spec in config.rewards.items():
        for kind in sorted({spec.kind} | kinds_in_options(spec.options)):
            extra, missing = missing_dependencies(kind)
            if missing:
                raise RewardConfigError(
                    f"rewards.{name}: kind {kind!r} needs {', '.join(missing)}: "
                    f"pip install 'dancegrpo-rewards[{extra}]'"
                )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dancegrpo-rewards`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "list":
        configure_logging("text", "WARNING")
        try:
            return _list(args)
        except Exception as exc:  # a CLI prints one line, not a traceback
            print(f"dancegrpo-rewards list: {exc}", file=sys.stderr)
            return 1
    try:
        config = load_config(args.config, require_files=not getattr(args, "no_file_check", False))
        if args.command == "check":
            _check_dependencies(config)
            print(f"{args.config}: OK ({', '.join(config.rewards)})")
            return 0
        if args.host:
            import dataclasses

            config = dataclasses.replace(
                config, server=dataclasses.replace(config.server, host=args.host)
            )
        configure_logging(config.server.log_format, config.server.log_level)
        tune_malloc()  # reuse request-sized buffers instead of re-faulting them per call
        return asyncio.run(_serve(config, args))
    except RewardConfigError as exc:
        print(f"dancegrpo-rewards: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
