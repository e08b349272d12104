from __future__ import annotations

HELP = "serve a model directory's classifier over the Open Inference Protocol (KServe V2 gRPC)"


def add_arguments(p) -> None:
    from ..settings import add_classifier_arguments

    add_classifier_arguments(p)


def run(args) -> int:
    from ..server.classifier import serve
    from ..settings import classifier_settings

    return serve(classifier_settings(args))
