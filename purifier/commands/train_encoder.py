from __future__ import annotations

import shlex
import sys

from .common import add_data, add_device, data_spec, resolve_device

HELP = "train the encoder E(x)->z that starts the fast projection near its answer"


def add_arguments(p) -> None:
    from ..training.encoder import EncoderTrainConfig as C

    add_data(p, paths=True)
    add_device(p)
    p.add_argument("--model-dir", default=None,
                   help="folder with generator.safetensors; encoder.safetensors goes there (default models/<dataset>)")
    p.add_argument("--steps", type=int, default=C.steps)
    p.add_argument("--batch-size", type=int, default=C.batch_size)
    p.add_argument("--lr", type=float, default=C.lr)
    p.add_argument("--latent-weight", type=float, default=C.latent_weight)
    p.add_argument("--recon-weight", type=float, default=C.recon_weight,
                   help="weight of the reconstruction loss on real training images (0: synthetic pairs only)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=C.precision)
    p.add_argument("--seed", type=int, default=C.seed)
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this long")
    p.add_argument("--latent-radius", type=float, default=C.latent_radius,
                   help="> 0: train the start on the sphere ||z|| = r*sqrt(D), as the fast projection "
                        "uses it (FAST: 1); 0: E's raw output")
    p.add_argument("--init", default=None, metavar="ENCODER",
                   help="continue from this encoder file (same generator) instead of from scratch, "
                        "e.g. the model directory's encoder.safetensors")
    p.add_argument("--denoise-eps", type=float, default=C.denoise_eps, metavar="EPS",
                   help="> 0: half of each real batch reaches E with a random +-EPS sign haze (clipped), "
                        "the loss still against the clean image (0: off)")
    p.add_argument("--holdout", type=int, default=None, metavar="N",
                   help="leave the last N training images out (the slice `purifier calibrate` then draws "
                        "from), so the detection threshold is chosen on images the encoder never saw; 0: train "
                        "on all. Default: with --init, the hold-out that encoder kept; else 0")


def run(args) -> int:
    from ..checkpoint import read_card
    from ..data import name_of
    from ..errors import ConfigError
    from ..training.encoder import EncoderTrainConfig, train

    cfg = EncoderTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             latent_weight=args.latent_weight, recon_weight=args.recon_weight,
                             precision=args.precision, seed=args.seed,
                             latent_radius=args.latent_radius, init=args.init, denoise_eps=args.denoise_eps,
                             max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)
    if args.holdout is not None and args.holdout < 0:
        raise ConfigError(f"--holdout must be >= 0, got {args.holdout}")
    device = resolve_device(args)

    def progress(step, lat, rec):
        print(f"step {step}: latent loss {lat:.4f}, recon loss {rec:.5f}", flush=True)

    # Without --data/--dataset: the data the model directory's card names, else the default.
    model_dir = args.model_dir or f"models/{name_of(data_spec(args)[0])}"
    spec, image_size = data_spec(args, read_card(model_dir))
    summary = train(model_dir, spec, cfg, args.data_dir, device,
                    command="purifier " + shlex.join(sys.argv[1:]), progress=progress, image_size=image_size,
                    holdout=args.holdout)
    print({k: summary[k] for k in ("file", "train_images", "steps_run", "wall_seconds",
                                   "train_recon_error_of_encoder_alone")}
          | ({"heldout_recon_error_of_encoder_alone": summary["holdout"]["recon_error_of_encoder_alone"]}
             if "holdout" in summary else {}))
    return 0
