from __future__ import annotations

HELP = ("serve purification over gRPC: purifier.v1 and the Open Inference Protocol (KServe V2), "
        "forwarding to a downstream classifier")


def add_arguments(p) -> None:
    from ..settings import add_serve_arguments

    add_serve_arguments(p)


def run(args) -> int:
    from ..errors import ConfigError, ModelLoadError
    from ..server import serve
    from ..settings import serve_settings

    try:
        settings = serve_settings(args)
        return serve(settings)
    except (ConfigError, ModelLoadError) as exc:
        import sys

        print(f"purifier serve: {exc}", file=sys.stderr)
        if isinstance(exc, ModelLoadError):
            print("  (pass --model-dir DIR or set PURIFIER_MODEL_DIR to a model directory)", file=sys.stderr)
        return 2
