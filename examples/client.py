"""Send clean and FGSM-perturbed test images to a classifier, directly and through purifier.

    python examples/client.py --purifier localhost:8081 --classifier localhost:8001 -n 32

The client is plain ``tritonclient[grpc]``, the one you would use against Triton: purifier
speaks the same Open Inference Protocol, so "with purification" is only a different address.
The model name is the downstream classifier's; purifier purifies the image input and forwards
the request under that name (a pass-through model).

The adversarial images are white-box FGSM on the local copy of the shipped classifier
(``models/<dataset>/classifier.safetensors``), by ``purifier.evaluation.attacks.fgsm``:
x' = clip(x + eps * sign(grad_x loss), 0, 1).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CLASSES = {
    "fashion-mnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Boot"],
    "mnist": [str(d) for d in range(10)],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--purifier", default="localhost:8081", help="purifier's gRPC address")
    p.add_argument("--classifier", default="localhost:8001",
                   help="the classifier server's gRPC address, for the unpurified baseline")
    p.add_argument("--no-direct", action="store_true",
                   help="skip the direct calls (when the classifier is not reachable from here, "
                        "as in the Kubernetes sidecar and KServe deployments)")
    p.add_argument("--model", default="classifier",
                   help="model name on the classifier server; purifier forwards under this name")
    p.add_argument("--dataset", default="fashion-mnist", choices=sorted(CLASSES))
    p.add_argument("--data-dir", default=None, help="folder with the IDX test files "
                   "(default: PURIFIER_DATA_DIR, /usr/share/datasets/<dataset>, ./data/<dataset>)")
    p.add_argument("--download", action="store_true",
                   help="let torchvision fetch the test set into ./data when it is not found (needs internet)")
    p.add_argument("--model-dir", default=None,
                   help="where the local classifier for FGSM lives (default: models/<dataset>)")
    p.add_argument("-n", "--num-images", type=int, default=16, help="test images to send")
    p.add_argument("--eps", type=float, default=0.3, help="FGSM step, in [0, 1] pixel units")
    p.add_argument("--batch-size", type=int, default=8, help="images per request")
    p.add_argument("--seed", type=int, default=0, help="which test images (seeded choice)")
    p.add_argument("--steps", type=int, default=None,
                   help="projection steps L per image (default: the server's preset)")
    p.add_argument("--restarts", type=int, default=None,
                   help="projection restarts R per image (default: the server's preset)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds per request (purification on a CPU takes a while)")
    p.add_argument("--authority", default=None,
                   help="HTTP/2 :authority to send, for ingress gateways that route on the host "
                        "name (KServe: <isvc>-transformer.<namespace>.<domain>)")
    p.add_argument("--show", type=int, default=8, help="print per-image answers for this many")
    return p.parse_args(argv)


# --- the images ---------------------------------------------------------------------------

def make_images(args) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Clean and FGSM images as float32 (N, C, H, W) in [0, 1], labels, local predictions."""
    import torch

    from purifier import checkpoint, data
    from purifier.evaluation.attacks import fgsm

    split = data.subset(data.load(args.dataset, "test", args.data_dir, download=args.download),
                        args.num_images, args.seed)
    model_dir = Path(args.model_dir) if args.model_dir else REPO / "models" / args.dataset
    classifier = checkpoint.load_module(model_dir / "classifier.safetensors", "classifier")
    clean = split.images
    adv = fgsm(classifier, clean, split.labels, args.eps)
    with torch.no_grad():
        local = {"clean": classifier(clean).argmax(1).numpy(), "fgsm": classifier(adv).argmax(1).numpy()}
    return clean.numpy(), adv.numpy(), split.labels.numpy(), local


# --- the wire -----------------------------------------------------------------------------

@dataclass
class Endpoint:
    """One V2 server and what its metadata says about the model's input and output."""

    name: str
    client: object
    model: str
    input_name: str
    datatype: str
    channels_last: bool
    output_name: str


def need_tritonclient() -> None:
    try:
        import tritonclient.grpc  # noqa: F401
    except ImportError:
        sys.exit(f"this example needs tritonclient: {sys.executable} -m pip install 'tritonclient[grpc]'")


def connect(name: str, url: str, model: str, authority: str | None = None) -> Endpoint:
    import tritonclient.grpc as grpcclient

    channel_args = [("grpc.default_authority", authority)] if authority else None
    client = grpcclient.InferenceServerClient(url=url, channel_args=channel_args)
    try:
        ready = client.is_server_ready() and client.is_model_ready(model)
    except Exception as exc:  # tritonclient raises InferenceServerException for transport errors
        sys.exit(f"{name} at {url} is not reachable: {exc}")
    if not ready:
        sys.exit(f"{name} at {url} is up but model {model!r} is not ready")
    meta = client.get_model_metadata(model, as_json=True)
    inp, out = meta["inputs"][0], meta["outputs"][0]
    dims = [int(d) for d in inp["shape"]]
    # NCHW unless the metadata's last dimension is a channel count and the second is not.
    channels_last = len(dims) == 4 and dims[-1] in (1, 3) and dims[1] not in (1, 3)
    return Endpoint(name, client, model, inp["name"], inp["datatype"], channels_last, out["name"])


def to_wire(x: np.ndarray, ep: Endpoint) -> np.ndarray:
    if ep.channels_last:
        x = x.transpose(0, 2, 3, 1)  # (N, H, W, C)
    if ep.datatype == "UINT8":
        return np.round(x * 255.0).astype(np.uint8)
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass
class Answers:
    preds: np.ndarray                   # (N,) predicted class
    errors: np.ndarray | None = None    # (N,) purifier's reconstruction error
    flagged: np.ndarray | None = None   # (N,) bool: above the calibrated threshold
    settings: str = ""                  # the L and R purifier used


def response_params(response) -> dict:
    """A V2 response's parameters as plain values (InferParameter is a oneof)."""
    out = {}
    for key, p in response.parameters.items():
        field = p.WhichOneof("parameter_choice")
        out[key] = getattr(p, field) if field else None
    return out


def infer(ep: Endpoint, x: np.ndarray, batch_size: int, timeout: float,
          options: dict | None = None) -> Answers:
    """Classes for all images, in requests of batch_size, and what purifier reported (it adds
    per-image results to the response parameters as comma-separated lists)."""
    import tritonclient.grpc as grpcclient

    preds, errors, flags, params = [], [], [], {}
    for start in range(0, len(x), batch_size):
        batch = to_wire(x[start:start + batch_size], ep)
        inp = grpcclient.InferInput(ep.input_name, list(batch.shape), ep.datatype)
        inp.set_data_from_numpy(batch)
        result = ep.client.infer(ep.model, [inp], outputs=[grpcclient.InferRequestedOutput(ep.output_name)],
                                 client_timeout=timeout, parameters=options or None)
        preds.append(result.as_numpy(ep.output_name).reshape(len(batch), -1).argmax(1))
        params = response_params(result.get_response())
        if "purifier_reconstruction_error" in params:
            errors += [float(e) for e in params["purifier_reconstruction_error"].split(",")]
            flags += [f == "1" for f in params["purifier_adversarial"].split(",")]
    answers = Answers(np.concatenate(preds))
    if errors:
        answers.errors, answers.flagged = np.array(errors), np.array(flags)
        calibrated = params.get("purifier_threshold_calibrated")
        answers.settings = (f"L={params.get('purifier_steps')} R={params.get('purifier_restarts')}, "
                            + (f"threshold {params['purifier_threshold']:.4g}" if calibrated
                               else "no calibrated threshold (nothing flagged)"))
    return answers


# --- the report ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    need_tritonclient()
    from purifier.errors import DataError, ModelLoadError

    try:
        clean, adv, labels, local = make_images(args)
    except DataError as exc:  # no data set here: what data.load says names the ways to get it
        sys.exit(f"client.py: {exc}")
    except ModelLoadError as exc:
        sys.exit(f"client.py: {exc}\n(--model-dir names the folder with classifier.safetensors)")
    names = CLASSES[args.dataset]
    print(f"{len(labels)} {args.dataset} test images; FGSM eps={args.eps} on the local classifier")

    routes = [] if args.no_direct else [("direct", connect("classifier", args.classifier, args.model))]
    routes.append(("purified", connect("purifier", args.purifier, args.model, args.authority)))
    ep = routes[-1][1]
    print(f"model {args.model!r}: input {ep.input_name} {ep.datatype} "
          f"{'NHWC' if ep.channels_last else 'NCHW'}, output {ep.output_name}")
    # per-request projection options, read (and stripped before forwarding) by purifier
    options = {k: v for k, v in (("purifier_steps", args.steps), ("purifier_restarts", args.restarts))
               if v is not None}

    answers = {("local", "clean"): Answers(local["clean"]), ("local", "fgsm"): Answers(local["fgsm"])}
    for route, endpoint in routes:
        for kind, images in (("clean", clean), ("fgsm", adv)):
            t0 = time.perf_counter()
            try:
                got = answers[route, kind] = infer(endpoint, images, args.batch_size, args.timeout,
                                                   options if route == "purified" else None)
            except Exception as exc:  # tritonclient's InferenceServerException: status and message
                hint = (" (raise --timeout, or send fewer images per request with --batch-size)"
                        if "DEADLINE_EXCEEDED" in str(exc) else "")
                sys.exit(f"{endpoint.name} failed on the {kind} images: {exc}{hint}")
            took = time.perf_counter() - t0
            print(f"  {route:8s} {kind:5s} {len(images)} images in {took:6.2f}s"
                  + (f" ({got.settings})" if got.settings else ""))

    print(f"\n  {f'accuracy, {len(labels)} images':28s} {'clean':>7s}  {'FGSM':>7s}")
    titles = {"local": "local classifier (no server)", "direct": "classifier server, direct",
              "purified": "through purifier"}
    for route, title in titles.items():
        if (route, "clean") in answers:
            acc = [100.0 * float(np.mean(answers[route, k].preds == labels)) for k in ("clean", "fgsm")]
            print(f"  {title:28s} {acc[0]:6.1f}%  {acc[1]:6.1f}%")
    purified = [answers["purified", k] for k in ("clean", "fgsm")]
    if all(a.errors is not None for a in purified):
        err = [f"{a.errors.mean():.4f}" for a in purified]
        flagged = [f"{int(a.flagged.sum())}/{len(a.flagged)}" for a in purified]
        print(f"  {'mean reconstruction error':28s} {err[0]:>7s}  {err[1]:>7s}")
        print(f"  {'flagged as adversarial':28s} {flagged[0]:>7s}  {flagged[1]:>7s}")

    shown = [r for r in ("direct", "purified") if (r, "clean") in answers]
    if args.show <= 0:
        return 0
    print(f"\n{'label':10s}" + "".join(f"{r + ' ' + k:>18s}" for r in shown for k in ("clean", "fgsm")))
    for i in range(min(args.show, len(labels))):
        cells = []
        for r in shown:
            for k in ("clean", "fgsm"):
                p = int(answers[r, k].preds[i])
                cells.append(f"{names[p] + ('  ' if p == labels[i] else ' x'):>18s}")
        print(f"{names[int(labels[i])]:10s}" + "".join(cells))
    print("(x: wrong answer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
