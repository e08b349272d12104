from __future__ import annotations

from .common import add_data, add_device, resolve_device

HELP = "train the Defense-GAN generator with WGAN-GP (checkpoints, --resume)"


def add_arguments(p) -> None:
    from ..train_gan import GANTrainConfig as C

    add_data(p)
    add_device(p)
    p.add_argument("--run-dir", default=None, help="checkpoints and samples (default runs/gan-<dataset>)")
    p.add_argument("--out", default=None, help="model directory to export the generator to")
    p.add_argument("--iterations", type=int, default=C.iterations, help="generator steps")
    p.add_argument("--batch-size", type=int, default=C.batch_size)
    p.add_argument("--n-critic", type=int, default=C.n_critic)
    p.add_argument("--lr", type=float, default=C.lr)
    p.add_argument("--gp-weight", type=float, default=C.gp_weight)
    p.add_argument("--ema", type=float, default=C.ema, help="EMA decay of G (0: off)")
    p.add_argument("--seed", type=int, default=C.seed)
    p.add_argument("--checkpoint-every", type=int, default=C.checkpoint_every)
    p.add_argument("--sample-every", type=int, default=C.sample_every)
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and checkpoint) after this long")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoint.pt")
    p.add_argument("--export-only", action="store_true",
                   help="export the last checkpoint to --out without training further")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from ..train_gan import GANTrainConfig, train

    cfg = GANTrainConfig(
        dataset=args.dataset, data_dir=args.data_dir, run_dir=args.run_dir or f"runs/gan-{args.dataset}",
        out_dir=args.out, iterations=args.iterations, batch_size=args.batch_size, n_critic=args.n_critic,
        lr=args.lr, gp_weight=args.gp_weight, ema=args.ema, seed=args.seed,
        checkpoint_every=args.checkpoint_every, sample_every=args.sample_every, device=resolve_device(args))
    summary = train(cfg, resume=args.resume, progress=not args.no_progress,
                    max_seconds=None if args.max_minutes is None else 60 * args.max_minutes,
                    export_only=args.export_only)
    print(summary)
    return 0
