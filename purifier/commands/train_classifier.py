from __future__ import annotations

from .common import add_data, add_device, data_spec, resolve_device

HELP = "train one of the paper's classifiers (A, B, C, D) and export it to a model directory"


def add_arguments(p) -> None:
    from ..training.classifier import ClassifierTrainConfig as C

    add_data(p, paths=True)
    add_device(p)
    p.add_argument("--arch", default=C.arch, choices=["A", "B", "C", "D"])
    p.add_argument("--out", default=None, help="model directory (default models/<dataset>)")
    p.add_argument("--name", default=C.name,
                   help="file stem and card section: 'classifier' (the protected model) or 'substitute'")
    p.add_argument("--epochs", type=int, default=C.epochs)
    p.add_argument("--batch-size", type=int, default=C.batch_size)
    p.add_argument("--lr", type=float, default=C.lr)
    p.add_argument("--shift", type=int, default=C.shift, help="random-translation augmentation (pixels)")
    p.add_argument("--seed", type=int, default=C.seed)
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from ..data import name_of
    from ..training.classifier import ClassifierTrainConfig, train

    spec, image_size = data_spec(args)
    cfg = ClassifierTrainConfig(dataset=spec, data_dir=args.data_dir, image_size=image_size, arch=args.arch,
                                out_dir=args.out or f"models/{name_of(spec)}", name=args.name,
                                epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, shift=args.shift,
                                seed=args.seed, device=resolve_device(args))
    summary = train(cfg, progress=not args.no_progress)
    print(summary["metrics"])
    return 0
