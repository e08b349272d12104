"""Exit 0 when a gRPC server reports SERVING on grpc.health.v1, 1 otherwise.

    python scripts/healthcheck.py [HOST:PORT] [--service NAME] [--timeout SECONDS]

The address defaults to localhost:$PURIFIER_GRPC_PORT (8081). It is the Docker
HEALTHCHECK and what scripts/run.sh waits on; Kubernetes needs none of it, since its
native gRPC probes speak the same protocol.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 3.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("address", nargs="?",
                   default=f"localhost:{os.environ.get('PURIFIER_GRPC_PORT', '8081')}")
    p.add_argument("--service", default="", help="health service name (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    return 0 if check(args.address, args.service, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
