from __future__ import annotations

from pathlib import Path

from .common import add_device, resolve_device

HELP = "purify PNG files or an IDX/NPY batch offline; writes purified images and errors.csv/json"

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "fashion-mnist"


def add_projection_arguments(p) -> None:
    from ..projection import PRESETS

    p.add_argument("--projection", default="paper", choices=sorted(PRESETS),
                   help="preset: paper (L=200, R=10, momentum SGD) or fast (see README, Speed)")
    p.add_argument("--steps", type=int, default=None, help="L, gradient steps (overrides the preset)")
    p.add_argument("--restarts", type=int, default=None, help="R, random restarts (overrides the preset)")
    p.add_argument("--lr", type=float, default=None, help="step size (overrides the preset)")
    p.add_argument("--optimizer", default=None, choices=["sgd", "adam"])
    p.add_argument("--seed", type=int, default=None, help="fixed seed (default: fresh randomness)")


def projection_config(args, has_encoder: bool = True):
    from ..projection import preset

    return preset(args.projection, has_encoder=has_encoder,
                  **{k: getattr(args, k) for k in ("steps", "restarts", "lr", "optimizer", "seed")})


def add_arguments(p) -> None:
    p.add_argument("inputs", nargs="+", help="PNG files, or one IDX (.gz ok) or .npy batch")
    p.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-progress", action="store_true")
    add_projection_arguments(p)
    add_device(p)


def run(args) -> int:
    from ..checkpoint import load_bundle
    from ..offline import purify_files

    device = resolve_device(args)
    bundle = load_bundle(args.model_dir, device)
    cfg = projection_config(args, has_encoder=bundle.encoder is not None)
    summary = purify_files(bundle, args.inputs, args.out, cfg, args.batch_size, device,
                           progress=not args.no_progress)
    print(f"purified {summary['images']} image(s) into {args.out}; "
          f"mean reconstruction error {summary['mean_reconstruction_error']:.5f}")
    return 0
