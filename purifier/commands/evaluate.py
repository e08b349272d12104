from __future__ import annotations

from .common import add_data, add_device, data_spec, resolve_device

HELP = ("measure robustness: accuracy under defense-oblivious, transfer and adaptive (BPDA+EOT) "
        "attacks, with and without purification, and detection ROC; writes results.json, "
        "results.md and figures (resumable)")


def _list(kind):
    def parse(text: str):
        return tuple(kind(v) for v in text.split(",") if v.strip()) if text else ()
    return parse


def add_arguments(p) -> None:
    from ..evaluation.evaluate import ATTACKS, PROJECTIONS, EvalConfig as C

    p.add_argument("model_dir", help="model directory (generator + classifier), e.g. models/mnist")
    add_data(p, default=None, paths=True)
    add_device(p)
    p.add_argument("--out", required=True, help="output directory: results, figures and the resume cache")
    p.add_argument("--n", type=int, default=C.n, help="test images (seeded choice) per cell")
    p.add_argument("--attacks", type=_list(str), default=C.attacks,
                   help=f"comma-separated, from {','.join(ATTACKS)} (default: {','.join(C.attacks)})")
    p.add_argument("--eps", type=_list(float), default=C.eps, help="L-inf budgets on [0, 1], comma-separated")
    p.add_argument("--projection", choices=sorted(PROJECTIONS), default=C.projection,
                   help="projection preset (paper: L=200 R=10 SGD; original: paper answering at the last "
                        "step, as the original code; fast: see README, 'Speed')")
    p.add_argument("--steps", type=int, default=None, help="override the preset's L")
    p.add_argument("--restarts", type=int, default=None, help="override the preset's R")
    p.add_argument("--latent-radius", type=float, default=None,
                   help="override the preset's latent sphere radius (0: unconstrained z, as the paper; "
                        "1: ||z|| = sqrt(latent_dim))")
    p.add_argument("--pgd-steps", type=int, default=C.pgd_steps)
    p.add_argument("--cw-steps", type=int, default=C.cw_steps, help="CW-L2 Adam steps per binary-search step")
    p.add_argument("--cw-search-steps", type=int, default=C.cw_search_steps)
    p.add_argument("--transfer-method", choices=["fgsm", "pgd"], default=C.transfer_method)
    p.add_argument("--substitute", default=None,
                   help="substitute classifier for the transfer attack (default <model_dir>/substitute.safetensors)")
    p.add_argument("--n-adaptive", type=int, default=C.n_adaptive, help="images for BPDA+EOT (first of the n)")
    p.add_argument("--adaptive-steps", type=int, default=C.adaptive_steps, help="BPDA+EOT PGD steps")
    p.add_argument("--eot-samples", type=int, default=C.eot_samples,
                   help="independent projections averaged per BPDA gradient")
    p.add_argument("--lambdas", type=_list(float), default=C.lambdas,
                   help="bpda-detect: weights of the reconstruction error (in units of the card threshold) "
                        "against the classifier's margin, comma-separated")
    p.add_argument("--lambda-eps", type=_list(float), default=(),
                   help="bpda-detect: eps at which every lambda runs (default: all); elsewhere --lambda-other")
    p.add_argument("--lambda-other", type=float, default=C.lambda_other)
    p.add_argument("--detect-kappa", type=float, default=C.detect_kappa,
                   help="bpda-detect and manifold: logit margin counted as a success")
    p.add_argument("--manifold-steps", type=int, default=C.manifold_steps,
                   help="manifold: Adam steps on z per binary-search round on the constant")
    p.add_argument("--manifold-search-steps", type=int, default=C.manifold_search_steps)
    p.add_argument("--sweep-l", type=_list(int), default=(), help="L values for accuracy vs L, e.g. 10,25,50,100,200")
    p.add_argument("--sweep-r", type=_list(int), default=(), help="R values for accuracy vs R, e.g. 1,2,5,10")
    p.add_argument("--sweep-n", type=int, default=C.sweep_n, help="images per sweep point")
    p.add_argument("--sweep-attack", choices=["fgsm", "pgd"], default=C.sweep_attack)
    p.add_argument("--sweep-eps", type=float, default=C.sweep_eps)
    p.add_argument("--blackbox-holdout", type=int, default=C.blackbox_holdout,
                   help="blackbox: the attacker's test images (the first ones, file order)")
    p.add_argument("--blackbox-n", type=int, default=C.blackbox_n,
                   help="blackbox: test images after the holdout that are attacked and measured")
    p.add_argument("--blackbox-rounds", type=int, default=C.blackbox_rounds,
                   help="blackbox: substitute training rounds (the set doubles between rounds)")
    p.add_argument("--blackbox-lambda", type=float, default=C.blackbox_lambda,
                   help="blackbox: Jacobian augmentation step")
    p.add_argument("--blackbox-epochs", type=int, default=C.blackbox_epochs, help="blackbox: epochs per round")
    p.add_argument("--blackbox-arch", choices=["A", "B", "C", "D"], default=C.blackbox_arch,
                   help="blackbox: substitute architecture")
    p.add_argument("--blackbox-labels", choices=["defended", "true"], default=C.blackbox_labels,
                   help="blackbox: labels of the held-out images: the defended model's answers, or the "
                        "true ones (as the original script); new points are always labelled by the defended model")
    p.add_argument("--blackbox-oracle", default=C.blackbox_oracle, metavar="HOST:PORT",
                   help="blackbox: label the substitute's data by asking this served model (Open Inference "
                        "Protocol V2 gRPC; e.g. a running `purifier serve` in front of its classifier) instead "
                        "of this run's own defended model: the attack a real black-box attacker makes. The "
                        "purified column is still measured here, with the local models")
    p.add_argument("--blackbox-oracle-model", default=C.blackbox_oracle_model, metavar="NAME",
                   help="blackbox: the model name to ask at --blackbox-oracle")
    p.add_argument("--batch-size", type=int, default=C.batch_size, help="images per projection call / cached chunk")
    p.add_argument("--adaptive-batch", type=int, default=C.adaptive_batch, help="images per cached BPDA chunk")
    p.add_argument("--seed", type=int, default=C.seed)
    p.add_argument("--n-show", type=int, default=C.n_show, help="images per figure grid")
    p.add_argument("--resume", action="store_true", help="continue the run in --out, reusing cached cells")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args):
    from ..evaluation.evaluate import EvalConfig

    return EvalConfig(
        model_dir=args.model_dir, out_dir=args.out, dataset=data_spec(args)[0], data_dir=args.data_dir,
        image_size=args.image_size, n=args.n,
        attacks=args.attacks, eps=args.eps, projection=args.projection, steps=args.steps,
        restarts=args.restarts, latent_radius=args.latent_radius, pgd_steps=args.pgd_steps, cw_steps=args.cw_steps,
        cw_search_steps=args.cw_search_steps, transfer_method=args.transfer_method,
        substitute=args.substitute, n_adaptive=args.n_adaptive, adaptive_steps=args.adaptive_steps,
        eot_samples=args.eot_samples, lambdas=args.lambdas, lambda_eps=args.lambda_eps,
        lambda_other=args.lambda_other, detect_kappa=args.detect_kappa, manifold_steps=args.manifold_steps,
        manifold_search_steps=args.manifold_search_steps, sweep_l=args.sweep_l, sweep_r=args.sweep_r,
        sweep_n=args.sweep_n,
        sweep_attack=args.sweep_attack, sweep_eps=args.sweep_eps, blackbox_holdout=args.blackbox_holdout,
        blackbox_n=args.blackbox_n, blackbox_rounds=args.blackbox_rounds, blackbox_lambda=args.blackbox_lambda,
        blackbox_epochs=args.blackbox_epochs, blackbox_arch=args.blackbox_arch,
        blackbox_labels=args.blackbox_labels, blackbox_oracle=args.blackbox_oracle,
        blackbox_oracle_model=args.blackbox_oracle_model, batch_size=args.batch_size,
        adaptive_batch=args.adaptive_batch, seed=args.seed, n_show=args.n_show, device=resolve_device(args))


def run(args) -> int:
    from pathlib import Path

    from ..evaluation.evaluate import run_evaluation

    cfg = config_from_args(args)
    oracle = None
    if cfg.blackbox_oracle and "blackbox" in cfg.attacks:
        from ..server.oracle import RemoteLabels

        oracle = RemoteLabels(cfg.blackbox_oracle, cfg.blackbox_oracle_model)
    try:
        results = run_evaluation(cfg, resume=args.resume, progress=not args.no_progress, oracle=oracle)
    finally:
        if oracle is not None:
            oracle.close()
    print((Path(args.out) / "results.md").read_text())
    print(f"wrote {args.out}/results.json, results.md and {len(results['figures'])} figures")
    return 0
