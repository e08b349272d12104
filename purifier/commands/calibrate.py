from __future__ import annotations

from .common import add_data, add_device, data_spec, resolve_device

HELP = ("pick the detection threshold for a target false-positive rate on clean validation images "
        "and write it into the model card (the service's `adversarial` flag uses it)")


def add_arguments(p) -> None:
    from ..projection import PRESETS

    p.add_argument("model_dir", help="model directory whose card.json gets the threshold")
    add_data(p, default=None, paths=True)
    add_device(p)
    p.add_argument("--target-fpr", type=float, default=0.05, help="share of clean images flagged (default 0.05)")
    p.add_argument("--n", type=int, default=1000, help="validation images that choose the threshold")
    p.add_argument("--heldout-n", type=int, default=1000,
                   help="other clean images of the same slice on which the chosen threshold's false-positive "
                        "rate is measured (the rate a server will see; at most HOLDOUT - N; 0: skip)")
    p.add_argument("--holdout", type=int, default=None,
                   help="draw the images from the last HOLDOUT of the training split (the usual "
                        "validation slice; the test split stays for `purifier eval`). Default: the "
                        "slice the model's encoder was trained without (`train-encoder --holdout`), "
                        "else 5000")
    p.add_argument("--projection", choices=sorted(PRESETS), default="paper",
                   help="projection preset; use the settings the service will run")
    p.add_argument("--steps", type=int, default=None, help="override the preset's L")
    p.add_argument("--restarts", type=int, default=None, help="override the preset's R")
    p.add_argument("--latent-radius", type=float, default=None, help="override the preset's latent sphere radius")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print the section, leave the card as it is")
    p.add_argument("--no-progress", action="store_true")


def operating_point(section: dict) -> str:
    """One line for the operator: the threshold and the clean rates it gives."""
    line = (f"threshold {section['threshold']:.6g} (target false-positive rate {section['target_fpr']:.1%}): "
            f"flags {section['fpr']:.1%} of the {section['n']} clean images that chose it")
    h = section.get("heldout")
    if h is None:
        line += "; no held-out images left to measure it on (raise --holdout or lower --n)"
    else:
        lo, hi = h["ci95"]
        line += (f" and {h['rate']:.1%} [95% {lo:.1%}, {hi:.1%}] ({h['flagged']}/{h['n']}) of held-out clean "
                 "images: the rate a server with this threshold flags (and, with --on-flagged reject, "
                 "refuses) clean inputs")
    p = section.get("precise_step")
    if p is not None:
        line += (f"\nprecise step: {p['clean_share_under']:.1%} ({p['under']}/{p['n']}) of the clean images start "
                 f"under the bar {p['below']:g} (median start error {p['start_error']['median']:.4g})")
        if p["clean_share_under"] < 0.95:
            line += ("; under 95%: this bar does not suit this data (clean images get the coarse step's looser "
                     "fit), see docs/speed.md")
    return line


def run(args) -> int:
    import json

    import torch

    from .. import checkpoint, data, detection
    from ..errors import ConfigError
    from ..projection import preset

    if not 0 <= args.target_fpr < 1:
        raise ConfigError(f"--target-fpr must be in [0, 1), got {args.target_fpr}")
    if args.n < 1 or (args.holdout is not None and args.holdout < 1) or args.heldout_n < 0:
        raise ConfigError("--n and --holdout must be >= 1, --heldout-n >= 0")
    device = resolve_device(args)
    bundle = checkpoint.load_bundle(args.model_dir, device)
    # The encoder fits its own training images closer than new ones: a threshold chosen on
    # errors of images it trained on flags more clean traffic than the target (docs/service.md).
    from ..training.encoder import unseen_holdout
    unseen = unseen_holdout(bundle.card.get("encoder")) if bundle.encoder is not None else None
    if args.holdout is None:
        args.holdout = unseen or 5000
    dataset, image_size = data_spec(args, bundle.card)
    if dataset is None:
        raise ConfigError(f"{args.model_dir}/card.json names no dataset: pass --dataset or --data")
    cfg = preset(args.projection, has_encoder=bundle.encoder is not None, steps=args.steps,
                 restarts=args.restarts, latent_radius=args.latent_radius)
    train = data.load(dataset, "train", args.data_dir, image_size=image_size)
    data.check_shape(train, bundle.image_shape, f"the generator in {args.model_dir}")
    args.holdout = min(args.holdout, len(train.labels))  # a small data set: all of it
    encoder_saw = cfg.encoder_starts > 0 and unseen is not None and unseen < args.holdout
    if encoder_saw:
        print(f"warning: the encoder in {args.model_dir} was trained on images of this slice (it held out "
              f"the last {unseen}, the slice is the last {args.holdout}): the threshold will flag more "
              f"clean inputs than {args.target_fpr:.0%}. Train it with `train-encoder --holdout "
              f"{args.holdout}`, or calibrate with --holdout {unseen}" if unseen else
              f"warning: the encoder in {args.model_dir} was trained on the images this threshold is chosen "
              f"on: it will flag more clean inputs than {args.target_fpr:.0%}. Train it with "
              f"`train-encoder --holdout {args.holdout}`", flush=True)
    held = data.last(train, args.holdout).images
    # One seeded order of the slice: the first N choose the threshold (the images data.subset
    # would pick), the next HELDOUT_N, disjoint from them, measure it.
    order = torch.randperm(len(held), generator=torch.Generator().manual_seed(args.seed))
    val, rest = held[order[:args.n]], held[order[args.n:args.n + args.heldout_n]]
    section = detection.calibrate(bundle.generator, val.to(device), cfg.with_(seed=args.seed),
                                  args.target_fpr, bundle.encoder, args.batch_size, not args.no_progress,
                                  heldout=rest.to(device))
    section["data"] = {"dataset": dataset, "split": "train",
                       "slice": f"last {args.holdout}" + (" of a fixed shuffle" if train.classes else ""),
                       "seed": args.seed, "source": train.source, "heldout_n": len(rest),
                       "unseen_by_encoder": None if cfg.encoder_starts == 0 or unseen is None else not encoder_saw,
                       **data.card_fields(image_size)}
    # The threshold holds for these weights only: a new generator or encoder needs a recalibration
    # (tests/test_model_family.py checks the shipped cards against their files).
    from ..benchmark.bench import file_digest
    section["models_sha256"] = {"generator": file_digest(checkpoint.generator_file(bundle.path, bundle.card)),
                                "encoder": file_digest(bundle.path / "encoder.safetensors")}
    print(json.dumps(section, indent=2))
    print(operating_point(section))
    if not args.dry_run:
        checkpoint.update_card(args.model_dir, detection=section)
        print(f"wrote the detection section into {args.model_dir}/card.json")
    return 0
