from __future__ import annotations

from .common import add_device, resolve_device

HELP = "train the Defense-GAN generator with WGAN-GP (graph-captured on CUDA, checkpoints, --resume)"
DATASETS = ("mnist", "fashion-mnist")


def add_arguments(p) -> None:
    from ..training.gan import GANTrainConfig as C

    p.add_argument("--dataset", default=None,
                   help="mnist, fashion-mnist, or both comma-separated (trained at once, one CUDA stream each); "
                        "default fashion-mnist")
    p.add_argument("--data-dir", default=None,
                   help="folder with the IDX files (default: PURIFIER_DATA_DIR, /usr/share/datasets/<name>, "
                        "../shared/datasets/<name>, ./data/<name>); may contain {dataset}")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="your images instead of --dataset: a folder (flat, or class subfolders; train/ inside "
                        "for a split), a .npy/.npz file or an IDX images file; the generator and critic are "
                        "chosen from the images' shape (docs/your-data.md)")
    p.add_argument("--image-size", type=int, default=None, metavar="S",
                   help="resize every image: shorter side to S, then the centre S x S (default: keep the size, "
                        "which all images must share)")
    add_device(p)
    p.add_argument("--run-dir", default=None,
                   help="checkpoints, samples, snapshots (default runs/gan-{dataset})")
    p.add_argument("--out", default=None,
                   help="model directory to export the generator to; with several data sets it must contain {dataset}")
    p.add_argument("--iterations", type=int, default=C.iterations, help="generator steps")
    p.add_argument("--batch-size", type=int, default=C.batch_size)
    p.add_argument("--n-critic", type=int, default=C.n_critic)
    p.add_argument("--lr", type=float, default=C.lr)
    p.add_argument("--gp-weight", type=float, default=C.gp_weight,
                   help="gradient penalty weight; 0 skips the penalty and its double backward")
    p.add_argument("--spectral-norm", action="store_true",
                   help="spectral normalisation on the critic's layers; with --gp-weight 0 --n-critic 1 the "
                        "cheaper recipe issue 9 tries (an experiment: docs/results.md has what it trained)")
    p.add_argument("--beta1", type=float, default=C.beta1, help="Adam beta1 of both optimisers")
    p.add_argument("--beta2", type=float, default=C.beta2, help="Adam beta2 of both optimisers")
    p.add_argument("--ema", type=float, default=C.ema, help="EMA decay of G (0: off)")
    p.add_argument("--seed", type=int, default=C.seed)
    p.add_argument("--checkpoint-every", type=int, default=C.checkpoint_every)
    p.add_argument("--sample-every", type=int, default=C.sample_every)
    p.add_argument("--log-every", type=int, default=C.log_every,
                   help="loss history interval (with a CUDA graph also how often the host syncs)")
    p.add_argument("--snapshot-at", default="",
                   help="comma-separated iterations at which to keep G and its EMA (runs/.../snapshots/)")
    p.add_argument("--cuda-graph", choices=["auto", "on", "off"], default=C.cuda_graph,
                   help="capture the training iteration as a CUDA graph (auto: when on CUDA, eager if capture fails)")
    p.add_argument("--check-graph", type=int, default=0, metavar="N",
                   help="before training on CUDA, compare N graph replays with N eager updates; stop if they differ")
    p.add_argument("--select-images", type=int, default=C.select_images,
                   help="training images on which G and its EMA are compared before export")
    p.add_argument("--select-by", choices=["reconstruction", "transfer", "defense"], default=C.select_by,
                   help="how export picks G or its EMA: reconstruction error on training images; purified "
                        "accuracy under a transfer FGSM on held-out training images (transfer); or the mean "
                        "of that and purified clean accuracy (defense). The last two need classifier and "
                        "substitute in --out; purifier.training.selection")
    p.add_argument("--part-mib", type=float, default=C.part_mib, help="checkpoint part size (MiB)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and checkpoint) after this long")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoint/")
    p.add_argument("--warm-start", default=None, metavar="MODEL_DIR",
                   help="without a checkpoint, continue from an exported generator + critic.safetensors "
                        "(not exact: fresh Adam and RNG); may contain {dataset}")
    p.add_argument("--export-only", action="store_true",
                   help="export the last checkpoint to --out without training further")
    p.add_argument("--no-progress", action="store_true")


def configs(args) -> list:
    from ..errors import ConfigError
    from ..training.gan import GANTrainConfig

    from ..data import name_of

    if args.data and args.dataset:
        raise ConfigError(f"give --dataset {args.dataset} or --data {args.data}, not both")
    if args.data:
        names = [args.data]
    else:
        names = [d.strip() for d in (args.dataset or "fashion-mnist").split(",") if d.strip()]
        bad = [d for d in names if d not in DATASETS]
        if not names or bad:
            raise ConfigError(f"--dataset: unknown data set(s) {bad or names}; choose from {', '.join(DATASETS)}, "
                              f"or give --data PATH")
    if len(set(names)) != len(names):
        raise ConfigError(f"--dataset names a data set twice: {args.dataset}")
    if len(names) > 1:
        for flag, value in (("--out", args.out), ("--run-dir", args.run_dir)):
            if value and "{dataset}" not in value:
                raise ConfigError(f"{flag} {value!r} would be shared by {len(names)} data sets; put {{dataset}} in it")
    try:
        snaps = tuple(sorted(int(s) for s in args.snapshot_at.split(",") if s.strip()))
    except ValueError as exc:
        raise ConfigError(f"--snapshot-at must be comma-separated integers, got {args.snapshot_at!r}") from exc
    device = resolve_device(args)
    out = []
    for d in names:
        fill = (lambda v: v.replace("{dataset}", name_of(d)) if v else v)
        out.append(GANTrainConfig(
            dataset=d, data_dir=fill(args.data_dir), image_size=args.image_size,
            run_dir=fill(args.run_dir) or f"runs/gan-{name_of(d)}",
            out_dir=fill(args.out), iterations=args.iterations, batch_size=args.batch_size,
            n_critic=args.n_critic, lr=args.lr, gp_weight=args.gp_weight, ema=args.ema, seed=args.seed,
            spectral_norm=args.spectral_norm, beta1=args.beta1, beta2=args.beta2,
            checkpoint_every=args.checkpoint_every, sample_every=args.sample_every, log_every=args.log_every,
            snapshot_at=snaps, cuda_graph=args.cuda_graph, part_mib=args.part_mib,
            select_images=args.select_images, select_by=args.select_by, warm_start=fill(args.warm_start), device=device))
    return out


def run(args) -> int:
    import json
    import signal

    import torch

    from ..training.gan import check_graph, train_many, training_images

    cfgs = configs(args)
    if args.check_graph and cfgs[0].device.startswith("cuda") and not args.export_only \
            and cfgs[0].cuda_graph != "off":
        for cfg in cfgs:
            images = training_images(cfg)
            try:
                result = check_graph(cfg, images, torch.device(cfg.device), args.check_graph)
            except Exception as exc:  # noqa: BLE001 - reported, then the eager step trains
                result = {"ok": False, "error": repr(exc)}
            print(f"{cfg.dataset}: graph vs eager {json.dumps(result)}", flush=True)
            if not result["ok"]:
                if cfg.cuda_graph == "on":
                    print(f"{cfg.dataset}: the captured step does not match the eager one; not training")
                    return 1
                print(f"{cfg.dataset}: the captured step does not match the eager one; training eagerly",
                      flush=True)
                for c in cfgs:
                    c.cuda_graph = "off"
                break
    summaries = train_many(cfgs, resume=args.resume, progress=not args.no_progress,
                           max_seconds=None if args.max_minutes is None else 60 * args.max_minutes,
                           export_only=args.export_only)
    for s in summaries:
        print(json.dumps(s))
    stopped = next((s["stopped_by"] for s in summaries if s.get("stopped_by", "time limit") != "time limit"), None)
    if stopped:  # checkpointed, not exported; the shell's convention for a signal, 128 + its number
        print(f"stopped by {stopped}: checkpoint saved, nothing exported; rerun with --resume to continue, "
              f"or --export-only to export it", flush=True)
        return 128 + int(getattr(signal, stopped))
    return 0
