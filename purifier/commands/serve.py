from __future__ import annotations

import os

# oneDNN primitives kept by a server (oneDNN's default: 1,024); see run().
PRIMITIVE_CACHE_CAPACITY = 4096

HELP = ("serve purification over gRPC: purifier.v1 and the Open Inference Protocol (KServe V2), "
        "forwarding to a downstream classifier")


def add_arguments(p) -> None:
    from ..settings import add_serve_arguments

    add_serve_arguments(p)


def run(args) -> int:
    # Before torch loads, as OpenMP reads it once: torch's idle pool threads sleep instead of
    # spinning. On a CPU shared with other work a spinning thread holds a core its partner
    # needs, and every parallel region waits for the descheduled one: on this 2-core machine at
    # load 9, one 1-image request took 2-25 s with spinning and 0.5 s without (1 thread: 0.6 s;
    # docs/service.md, Hardening). OMP_WAIT_POLICY=ACTIVE in the environment restores spinning.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # oneDNN keeps a primitive per layer, pass and input shape, 1,024 by default. A server runs
    # every batch size up to --max-batch-size, before and after pruning: 3,230 primitives for
    # 1-64 images at the fast preset. At 1,024 they were rebuilt on every sweep, each a long-lived
    # allocation among the projection thread's freed activations, and glibc kept more and more:
    # RSS 1,393 -> 1,580 -> 1,675 MB over three sweeps, flat at 1,534 MB with 4,096 and less CPU
    # (issue 11; docs/service.md, Soak). An explicit ONEDNN_/DNNL_PRIMITIVE_CACHE_CAPACITY wins.
    if "DNNL_PRIMITIVE_CACHE_CAPACITY" not in os.environ:
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(PRIMITIVE_CACHE_CAPACITY))
    from ..server import serve
    from ..settings import kserve_ignored, serve_settings

    settings = serve_settings(args)
    _log_kserve_flags(kserve_ignored(args), settings.log_level)
    return serve(settings)


def _log_kserve_flags(flags: dict[str, str], level: str) -> None:
    """One log line for the KServe flags accepted and not used; a warning when one asks for a
    protocol purifier does not speak to its predictor (it forwards over gRPC V2 only)."""
    if not flags:
        return
    import logging

    from ..server import logs

    logs.configure(level)
    log = logging.getLogger("purifier.serve")
    logs.log(log, logging.INFO, "ignoring KServe flags purifier has no use for", flags=flags)
    for flag in ("--protocol", "--predictor_protocol"):
        if flags.get(flag, "grpc-v2") != "grpc-v2":
            logs.log(log, logging.WARNING, f"{flag} {flags[flag]}: purifier forwards to its predictor "
                     "over gRPC V2 only; give the predictor a gRPC port (protocolVersion: grpc-v2)")
