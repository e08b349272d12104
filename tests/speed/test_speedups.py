"""Each speed-up keeps the projection's answer at least as good as what it skipped would
have guaranteed. No test here asserts a timing."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from purifier.projection import ProjectionConfig, project

ADAM = ProjectionConfig(steps=60, restarts=6, optimizer="adam", lr=0.05, seed=3)
TOL = 1e-6  # batch size changes the float summation order of G's convolutions


def generator_passes(gen, fn) -> int:
    """Latents pushed through G with gradients on (the projection's steps)."""
    n = [0]
    h = gen.register_forward_hook(lambda m, i, o: n.__setitem__(0, n[0] + o.shape[0])
                                  if torch.is_grad_enabled() else None)
    try:
        fn()
    finally:
        h.remove()
    return n[0]


@pytest.mark.parametrize("keep", [1, 2])
def test_pruning_never_returns_worse_than_the_best_restart_at_the_prune(sharp_gen, mixed_batch, keep):
    P = 10
    pruned = project(sharp_gen, mixed_batch, ADAM.with_(prune_after=P, keep=keep))
    # Same seed, no pruning, stopped at the prune: the best of all restarts so far.
    at_prune = project(sharp_gen, mixed_batch, ADAM.with_(steps=P - 1))
    assert torch.all(pruned.errors <= at_prune.errors * (1 + TOL) + 1e-9)
    # ... and pruning did cut the work.
    full = generator_passes(sharp_gen, lambda: project(sharp_gen, mixed_batch, ADAM))
    cut = generator_passes(sharp_gen, lambda: project(sharp_gen, mixed_batch, ADAM.with_(prune_after=P, keep=keep)))
    assert cut < full


def test_early_stopping_never_returns_worse_than_its_last_check(sharp_gen, mixed_batch):
    cfg = ADAM.with_(steps=200, early_stop_tol=0.05, check_every=5)
    stopped = project(sharp_gen, mixed_batch, cfg)
    # Every image runs at least two check periods before it can retire.
    floor = project(sharp_gen, mixed_batch, ADAM.with_(steps=2 * cfg.check_every))
    assert torch.all(stopped.errors <= floor.errors * (1 + TOL) + 1e-9)
    # Some images did retire early, so fewer generator passes than the full run.
    es = generator_passes(sharp_gen, lambda: project(sharp_gen, mixed_batch, cfg))
    full = generator_passes(sharp_gen, lambda: project(sharp_gen, mixed_batch, cfg.with_(early_stop_tol=0)))
    assert es < full


def test_early_stopping_with_pruning_returns_consistent_answers(sharp_gen, mixed_batch):
    cfg = ADAM.with_(steps=100, prune_after=10, keep=2, early_stop_tol=0.02, check_every=5)
    p = project(sharp_gen, mixed_batch, cfg)
    with torch.no_grad():
        torch.testing.assert_close(p.images, sharp_gen(p.latents))
    torch.testing.assert_close(p.errors, (p.images - mixed_batch).pow(2).flatten(1).mean(1))
    floor = project(sharp_gen, mixed_batch, ADAM.with_(steps=9))
    assert torch.all(p.errors <= floor.errors * (1 + TOL) + 1e-9)


def test_encoder_start_lowers_the_initial_error(sharp_gen, mixed_batch):
    from purifier.training.encoder import EncoderTrainConfig, fit_encoder

    real = mixed_batch[:4].repeat(8, 1, 1, 1)
    enc, stats = fit_encoder(sharp_gen, real, EncoderTrainConfig(steps=300, batch_size=32, lr=3e-3, dim=8))
    assert stats["steps_run"] == 300
    on_range = mixed_batch[:4]
    start = ProjectionConfig(steps=0, restarts=1, seed=0)
    random_start = project(sharp_gen, on_range, start).errors
    encoder_start = project(sharp_gen, on_range, start.with_(encoder_starts=1), encoder=enc).errors
    assert encoder_start.mean() < 0.5 * random_start.mean()
    # And after a few steps the encoder-started projection is still ahead.
    few = ADAM.with_(steps=10, restarts=2)
    assert (project(sharp_gen, on_range, few.with_(encoder_starts=1), encoder=enc).errors.mean()
            < project(sharp_gen, on_range, few).errors.mean())


def test_encoder_trained_on_the_sphere_gives_the_start_fast_uses(sharp_gen, mixed_batch, tmp_path):
    """latent_radius puts E's output on the sphere before G, as FAST's projection does; an
    encoder trained that way starts FAST's search closer than one trained off the sphere, and
    init continues from saved weights (0 steps: the same encoder)."""
    from purifier import checkpoint
    from purifier.training.encoder import EncoderTrainConfig, fit_encoder, start_error

    D = sharp_gen.latent_dim
    g = torch.Generator().manual_seed(3)
    z = torch.randn(32, D, generator=g)
    z = z * (math.sqrt(D) / z.norm(dim=1, keepdim=True))
    with torch.no_grad():
        real = sharp_gen(z)                              # on G's range, on the sphere
    base = EncoderTrainConfig(steps=300, batch_size=32, lr=3e-3, dim=8, latent_weight=0.0)
    off, _ = fit_encoder(sharp_gen, real, base)
    on, _ = fit_encoder(sharp_gen, real, replace(base, latent_radius=1.0))
    assert start_error(sharp_gen, on, real, 1.0) < start_error(sharp_gen, off, real, 1.0)
    start = ProjectionConfig(steps=0, restarts=1, encoder_starts=1, latent_radius=1.0, seed=0)
    assert (project(sharp_gen, real, start, encoder=on).errors.mean()
            < project(sharp_gen, real, start, encoder=off).errors.mean())

    path = tmp_path / "encoder.safetensors"
    checkpoint.save_module(on, path, "encoder")
    same, stats = fit_encoder(sharp_gen, real, EncoderTrainConfig(steps=0, dim=8, init=str(path)))
    assert stats["steps_run"] == 0
    for a, b in zip(same.state_dict().values(), on.state_dict().values()):
        torch.testing.assert_close(a, b)
    other = tmp_path / "other.safetensors"  # an encoder for another latent size
    checkpoint.save_module(type(on)(D + 1, *sharp_gen.image_shape.as_tuple(), dim=8), other, "encoder")
    with pytest.raises(ValueError, match="is an encoder for latent"):
        fit_encoder(sharp_gen, real, EncoderTrainConfig(steps=0, dim=8, init=str(other)))


def test_continued_encoder_training_keeps_the_record_it_continued(tiny_model_dir, tmp_path):
    """train(init=the model's encoder) replaces the encoder and records the training it continued
    (the card's previous encoder section) and the sphere it was trained for."""
    import numpy as np

    from purifier import checkpoint
    from purifier.training.encoder import EncoderTrainConfig, train

    checkpoint.update_card(tiny_model_dir, encoder=dict(file="encoder.safetensors", steps_run=7, command="first"))
    gen = checkpoint.load_generator(tiny_model_dir / "generator.safetensors")
    images = np.random.default_rng(0).random((40, *gen.image_shape.as_tuple()), dtype=np.float32)
    np.save(tmp_path / "train.npy", images)
    before = checkpoint.load_module(tiny_model_dir / "encoder.safetensors", "encoder").state_dict()
    cfg = EncoderTrainConfig(steps=3, batch_size=8, dim=4, latent_radius=1.0,
                             init=str(tiny_model_dir / "encoder.safetensors"))
    section = train(str(tiny_model_dir), str(tmp_path / "train.npy"), cfg, command="second")
    card = checkpoint.read_card(tiny_model_dir)["encoder"]
    assert card["command"] == "second" and card["steps_run"] == 3 and card["settings"]["latent_radius"] == 1.0
    assert card["continued_from"]["command"] == "first" and card["continued_from"]["steps_run"] == 7
    assert section["continued_from"] == card["continued_from"]
    after = checkpoint.load_module(tiny_model_dir / "encoder.safetensors", "encoder").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained, and saved over the old one


def test_bf16_steers_but_fp32_scores(sharp_gen, mixed_batch):
    p16 = project(sharp_gen, mixed_batch, ADAM.with_(precision="bf16"))
    p32 = project(sharp_gen, mixed_batch, ADAM)
    with torch.no_grad():  # the reported answer is exact fp32, whatever steered the search
        torch.testing.assert_close(p16.images, sharp_gen(p16.latents))
    torch.testing.assert_close(p16.errors, (p16.images - mixed_batch).pow(2).flatten(1).mean(1))
    start = project(sharp_gen, mixed_batch, ADAM.with_(steps=0, restarts=1)).errors
    assert (p16.errors[:4] < start[:4] / 10).all()  # the on-range half is solved
    assert p16.errors.mean() <= 2 * p32.errors.mean() + 1e-6


def test_auto_precision_is_bf16_only_where_native(sharp_gen, mixed_batch):
    from purifier.projection import fast_bf16, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if fast_bf16(cpu) else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"
    p = project(sharp_gen, mixed_batch, ADAM.with_(steps=5, precision="auto"))
    torch.testing.assert_close(p.errors, (p.images - mixed_batch).pow(2).flatten(1).mean(1))


@pytest.mark.slow
def test_compiled_step_matches_eager_on_cpu(sharp_gen, mixed_batch):
    cfg = ADAM.with_(steps=20, prune_after=5, keep=2)
    eager = project(sharp_gen, mixed_batch, cfg)
    compiled = project(sharp_gen, mixed_batch, cfg.with_(compile=True))
    torch.testing.assert_close(compiled.latents, eager.latents, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(compiled.errors, eager.errors, atol=1e-6, rtol=1e-3)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_step_matches_eager_on_gpu(sharp_gen, mixed_batch, precision):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    g, x = sharp_gen.cuda(), mixed_batch.cuda()
    cfg = ADAM.with_(steps=20, prune_after=5, keep=2, precision=precision)
    eager = project(g, x, cfg)
    graphed = project(g, x, cfg.with_(compile=True))
    again = project(g, x, cfg.with_(compile=True))  # a replay, not a fresh capture
    if precision == "fp32":
        torch.testing.assert_close(graphed.latents, eager.latents, atol=1e-4, rtol=1e-3)
    else:  # bf16 rounding differs between fused and eager kernels, so 20 Adam steps drift
        # apart (seen on an H200: 2 of 64 latent values off by ~0.1); the answers must be as good.
        torch.testing.assert_close(graphed.errors, eager.errors, atol=2e-3, rtol=0.1)
    torch.testing.assert_close(again.latents, graphed.latents)
    torch.testing.assert_close(graphed.errors, (graphed.images - x).pow(2).flatten(1).mean(1))


@pytest.mark.gpu
@needs_cuda
def test_channels_last_matches_on_gpu(sharp_gen, mixed_batch):
    g, x = sharp_gen.cuda(), mixed_batch.cuda()
    ref = project(g, x, ADAM.with_(steps=20))
    cl = project(g, x, ADAM.with_(steps=20, channels_last=True))
    torch.testing.assert_close(cl.latents, ref.latents, atol=1e-3, rtol=1e-3)


def test_cuda_graph_is_refused_off_cuda_and_with_early_stopping(sharp_gen, mixed_batch):
    from purifier.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="CUDA"):
        project(sharp_gen, mixed_batch, ADAM.with_(steps=2, cuda_graph=True))
    with pytest.raises(InvalidInputError, match="early stopping"):
        ADAM.with_(cuda_graph=True, early_stop_tol=1e-3)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_whole_search_cuda_graph_matches_eager_on_gpu(sharp_gen, mixed_batch, precision):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    g, x = sharp_gen.cuda(), mixed_batch.cuda()
    cfg = ADAM.with_(steps=20, prune_after=5, keep=2, precision=precision, seed=3)
    eager = project(g, x, cfg)
    graphed = project(g, x, cfg.with_(cuda_graph=True))
    x2 = torch.rand_like(x)
    replay = project(g, x2, cfg.with_(cuda_graph=True))       # same shape: a replay with new inputs
    eager2 = project(g, x2, cfg)
    tol = dict(atol=1e-4, rtol=1e-3) if precision == "fp32" else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(graphed.latents, eager.latents, **tol)
    torch.testing.assert_close(replay.latents, eager2.latents, **tol)
    torch.testing.assert_close(graphed.errors, (graphed.images - x).pow(2).flatten(1).mean(1))
    assert (replay.errors <= eager2.errors * 1.05 + 1e-6).all()


@pytest.mark.gpu
@needs_cuda
def test_whole_search_cuda_graph_keeps_the_step_size_per_image_on_gpu(sharp_gen, mixed_batch):
    """fast-precise's per-image step (a torch.where on the starts' errors, no host sync) inside
    the captured search: the graph answers as the eager search, image by image."""
    from purifier.projection import start_errors

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    g, x = sharp_gen.cuda(), mixed_batch.cuda()
    base = ADAM.with_(steps=20, prune_after=5, keep=1, seed=3)
    bar = float(start_errors(g, x, base).median())              # about half the images under it
    cfg = base.with_(precise_below=bar, precise_lr=0.01)
    eager = project(g, x, cfg)
    graphed = project(g, x, cfg.with_(cuda_graph=True))
    torch.testing.assert_close(graphed.latents, eager.latents, atol=1e-4, rtol=1e-3)
    assert not torch.allclose(eager.latents, project(g, x, base).latents, atol=1e-3)   # the bar mattered


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_latent_radius_keeps_every_answer_on_the_sphere(sharp_gen, mixed_batch, optimizer):
    cfg = ADAM.with_(steps=15, optimizer=optimizer, lr=0.05 if optimizer == "adam" else 1.0,
                     prune_after=5, keep=2, latent_radius=1.0)
    out = project(sharp_gen, mixed_batch, cfg)
    D = sharp_gen.latent_dim
    torch.testing.assert_close(out.latents.norm(dim=1), torch.full((len(mixed_batch),), D ** 0.5),
                               rtol=1e-5, atol=1e-5)
    # the reported error is the error of the returned latents
    torch.testing.assert_close(out.errors, (sharp_gen(out.latents) - mixed_batch).pow(2).flatten(1).mean(1))


def test_latent_radius_zero_leaves_the_search_unconstrained(sharp_gen, mixed_batch):
    B, D = len(mixed_batch), sharp_gen.latent_dim
    drawn = torch.randn(B, 1, D, generator=torch.Generator().manual_seed(ADAM.seed))[:, 0] / D ** 0.5
    start = ADAM.with_(steps=0, restarts=1)
    # radius 0: the start is the draw itself; radius 1 would have rescaled it to norm sqrt(D)
    torch.testing.assert_close(project(sharp_gen, mixed_batch, start.with_(latent_radius=0.0)).latents, drawn)
    on = project(sharp_gen, mixed_batch, start.with_(latent_radius=1.0)).latents
    torch.testing.assert_close(on, drawn * (D ** 0.5 / drawn.norm(dim=1, keepdim=True)))
    # ... and the steps are not pulled onto any sphere either: the answers' norms differ
    free = project(sharp_gen, mixed_batch, ADAM.with_(steps=10, latent_radius=0.0)).latents.norm(dim=1)
    assert free.std() > 1e-3 * free.mean()


def test_denoise_eps_feeds_half_the_real_batch_hazed(sharp_gen, monkeypatch):
    """denoise_eps e: the first half of each real batch reaches E as clip(x +- e), the rest as
    x (the loss compares G(E(.)) with the clean x); e = 0 leaves the inputs untouched."""
    from purifier.training import encoder as enc_mod

    seen = []

    class Recording(enc_mod.Encoder):
        def forward(self, x):
            seen.append(x.detach().clone())
            return super().forward(x)

    monkeypatch.setattr(enc_mod, "Encoder", Recording)
    real = torch.rand(16, *sharp_gen.image_shape.as_tuple(), generator=torch.Generator().manual_seed(0))
    cfg = enc_mod.EncoderTrainConfig(steps=1, batch_size=8, dim=4, latent_weight=1.0, denoise_eps=0.25)
    enc_mod.fit_encoder(sharp_gen, real, cfg)
    synthetic, hazed = seen[0], seen[1]   # E(G(z)) first, then E on the real batch
    rows = real.flatten(1)
    clean_idx = [next(i for i in range(16) if torch.equal(rows[i], h.flatten())) for h in hazed[4:]]
    assert len(clean_idx) == 4                                            # the second half: untouched
    for h in hazed[:4]:                                                   # the first half: +-0.25, clipped
        x = rows[(rows - h.flatten()).abs().amax(1).argmin()]
        d = h.flatten() - x
        inside = (x > 0.25) & (x < 0.75)
        assert torch.allclose(d[inside].abs(), torch.full_like(d[inside], 0.25), atol=1e-6)
        assert ((h >= 0) & (h <= 1)).all()
    seen.clear()
    enc_mod.fit_encoder(sharp_gen, real, cfg.__class__(steps=1, batch_size=8, dim=4, latent_weight=1.0))
    assert all(any(torch.equal(r, x.flatten()) for r in rows) for x in seen[1])   # e = 0: inputs as they are
