"""The Ray Serve settings the service runs with, as the environment of every Ray process of a local cluster.

    RAY_SERVE_ENABLE_HA_PROXY=1   HTTP goes from HAProxy straight to the gateway replicas (Serve's "direct
                                  ingress"): no Python proxy actor and no Ray hop per streamed chunk.
                                  HAProxy also spreads connections over several gateway replicas.
    RAY_SERVE_USE_GRPC_BY_DEFAULT=1              handle calls between deployments (gateway -> experts)
    RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 go over gRPC, and user code and the router run on the
    RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0      replica's own event loop: fewer thread hops per call
                                  (the settings of Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED mode).
    RAY_SERVE_HAPROXY_*_PORT      HAProxy's stats and metrics listeners, on free ports so two services (or a
                                  service and the test suite) can share a machine.
    RAY_SERVE_FALLBACK_PROXY_*_PORT  the Python proxy HAProxy falls back to while no gateway replica is up, on
                                  free ports too. Serve's fixed default (8500) is bound with SO_REUSEPORT, so a
                                  second service on the machine shared it silently: the kernel handed some of
                                  its early requests to the FIRST service's proxy, which answered them with
                                  its own gateway and experts (seen in the test suite: a starting service's
                                  /health and a stream were served by the suite's service).
    RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=5   a stopping gateway replica stays reachable this long
                                  for HAProxy to drop it (Serve's default, 30 s, made every stop and every
                                  gateway restart wait half a minute after its requests were done; on one
                                  machine HAProxy reloads in ~0.5 s). Local Ray only: the KubeRay file keeps
                                  Serve's 30 s, for ingresses that take longer to deregister.

`ensemble serve` starts Ray with these. On a cluster you start yourself, export the same variables before
`ray start` on every node (deploy/kuberay-rayservice.yaml does it for KubeRay). They are Serve-wide: Serve
reads them when its controller and replicas start.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

DEFAULTS = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}
# Listeners every Serve instance opens on a fixed default port: each local service gets free ones instead.
PER_SERVICE_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                     "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")
# Where Serve puts its replicas' direct-ingress HTTP and gRPC listeners (RAY_SERVE_DIRECT_INGRESS_MIN/MAX_*_PORT
# defaults): free_port stays out of them, or a service's listener could take the port a replica is given next.
SERVE_REPLICA_PORTS = ((30000, 31000), (40000, 41000))
# Only for the Ray that `ensemble serve` (or the test suite) starts on one machine.
LOCAL_DEFAULTS = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5"}


def free_port() -> int:
    """A port nothing listens on now, for a server that binds it later, chosen OUTSIDE the kernel's ephemeral
    range: a port from that range can be handed to any outgoing connection or bind to port 0 in between (seen:
    HAProxy's metrics listener failing with "Address already in use" while Ray started its workers)."""
    lo, hi = _ephemeral_range()
    below = range(20000, lo) if lo > 20000 else range(0)
    pool = below if len(below) else range(min(hi + 1, 65535), 65536)
    rng = random.SystemRandom()
    for _ in range(64):
        port = rng.choice(pool)
        if any(a <= port <= b for a, b in SERVE_REPLICA_PORTS):
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:                 # everything tried was taken: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999                    # Linux's default


def serve_env(overrides: dict[str, str] | None = None) -> dict[str, str]:
    ports: list[int] = []
    while len(ports) < len(PER_SERVICE_PORTS):
        if (port := free_port()) not in ports:
            ports.append(port)
    env = {**DEFAULTS, **LOCAL_DEFAULTS, **{name: str(port) for name, port in zip(PER_SERVICE_PORTS, ports)}}
    env.update(overrides or {})
    return env
