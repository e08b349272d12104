"""Adversarial attacks in plain torch, for the evaluation (``purifier eval``).

Images are float (B, C, H, W) in [0, 1]; labels are int64 (B,); ``model`` maps images to
logits and is used as given (put it in eval mode first). Every attack returns detached
adversarial images in [0, 1] and never changes the model's weights.

- :func:`fgsm`: one signed-gradient step of size eps (Goodfellow et al. 2015).
- :func:`pgd_linf`: projected gradient descent in the L-inf ball, uniform random start
  (Madry et al. 2018).
- :func:`cw_l2`: Carlini & Wagner's L2 attack (tanh variables, Adam, binary search on c).
- :class:`BPDAPurifier` + :func:`bpda_eot_pgd`: the adaptive attack on the whole defense
  (Athalye, Carlini & Wagner 2018): forward through the projection, backward as the identity
  (BPDA), the gradient averaged over several independent projections (EOT).
- :func:`bpda_eot_detect_pgd`: the same attack made detection-aware: it also pushes the
  reconstruction error under the detector's threshold (weight lambda), so that the adversarial
  image is misclassified after purification *and* not flagged.
- :func:`on_manifold`: Athalye et al. 2018's on-manifold attack on Defense-GAN: a G(z) that
  is misclassified and close to x, submitted as is.
- :func:`papernot_substitute` + :func:`jacobian_augmentation`: the black-box attacker of
  Papernot et al. 2017 as the original Defense-GAN code runs it (kabkabm/defensegan
  ``blackbox.py`` on cleverhans 2): a substitute trained only on labels queried from the
  defended model, its training set grown by Jacobian-based augmentation; FGSM is then
  crafted on the substitute (:func:`fgsm` with the substitute's own predictions as labels).

Why not IBM ART at run time: its estimators work on numpy batches on the host, its CW-L2
is far slower than this one, and it has no BPDA through our projection. The tests check
these implementations against ART's on the same model (``tests/eval/test_attacks.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..projection import ProjectionConfig, project


def loss_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eot_samples: int = 1) -> torch.Tensor:
    """Gradient of the summed cross-entropy with respect to x.

    With ``eot_samples`` = k > 1 the batch is repeated k times in one forward pass, so a
    randomised model (the purifier) sees k independent draws, and the gradient is the mean
    of the k per-draw gradients (Expectation over Transformation).
    """
    x = x.detach().requires_grad_(True)
    xr = x.repeat(eot_samples, 1, 1, 1) if eot_samples > 1 else x   # (k*B, C, H, W)
    yr = y.repeat(eot_samples) if eot_samples > 1 else y            # (k*B,)
    with torch.enable_grad():
        # The loss in float64: a confident float32 softmax rounds p_y to exactly 1, and the
        # gradient vanishes (gradient masking by overconfidence, not robustness).
        loss = F.cross_entropy(model(xr).double(), yr, reduction="sum") / eot_samples
        (grad,) = torch.autograd.grad(loss, x)
    return grad                                                     # (B, C, H, W)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method: x + eps * sign(grad), clipped to [0, 1]."""
    grad = loss_gradient(model, x, y)
    return (x + eps * grad.sign()).clamp(0.0, 1.0).detach()


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 40,
             step_size: float | None = None, random_start: bool = True,
             generator: torch.Generator | None = None, eot_samples: int = 1) -> torch.Tensor:
    """PGD in the L-inf ball of radius eps around x (intersected with [0, 1]).

    ``step_size`` defaults to 2.5 * eps / steps (Madry et al.'s rule: the walk can cross the
    ball more than twice). The random start is uniform in the ball, drawn from ``generator``.
    """
    if step_size is None:
        step_size = 2.5 * eps / max(steps, 1)
    x = x.detach()
    lo, hi = (x - eps).clamp(min=0.0), (x + eps).clamp(max=1.0)
    if random_start:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_adv = torch.max(torch.min(x + (2 * noise - 1) * eps, hi), lo)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        grad = loss_gradient(model, x_adv, y, eot_samples)
        x_adv = torch.max(torch.min(x_adv + step_size * grad.sign(), hi), lo)
    return x_adv.detach()


def _adam_step(p: torch.Tensor, grad: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, t: int,
               lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> torch.Tensor:
    """One Adam step written out (as in projection.py: torch.optim's first use imports the
    compiler stack); updates the moments m1, m2 in place and returns the new point."""
    m1.mul_(beta1).add_(grad, alpha=1 - beta1)
    m2.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    return p - lr * (m1 / (1 - beta1 ** t)) / ((m2 / (1 - beta2 ** t)).sqrt() + eps)


def _bisect_const(const, lower, upper, succeeded):
    """Carlini-Wagner's search on the loss constant, per image: halve towards the bracket where
    an attack succeeded, multiply by 10 until one does. Returns (const, lower, upper)."""
    upper = torch.where(succeeded, torch.minimum(upper, const), upper)
    lower = torch.where(succeeded, lower, torch.maximum(lower, const))
    return torch.where(torch.isfinite(upper), (lower + upper) / 2, const * 10), lower, upper


def cw_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 100,
          binary_search_steps: int = 5, initial_const: float = 0.1, lr: float = 0.01,
          confidence: float = 0.0) -> torch.Tensor:
    """Carlini & Wagner's untargeted L2 attack.

    Minimises ||x' - x||^2 + c * max(Z_y - max_{j != y} Z_j + confidence, 0) over
    x' = (tanh(w) + 1) / 2, with Adam, and binary-searches c per image (x10 while no success).
    Returns the smallest-L2 adversarial example found per image, or x where none was found.
    """
    x = x.detach()
    B = x.shape[0]
    dev = x.device
    w0 = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))       # (B, C, H, W)
    onehot = F.one_hot(y, num_classes=model(x[:1]).shape[1]).bool()  # (B, K)
    const = torch.full((B,), initial_const, device=dev)
    lower = torch.zeros(B, device=dev)
    upper = torch.full((B,), float("inf"), device=dev)
    best_l2 = torch.full((B,), float("inf"), device=dev)
    best = x.clone()

    for _ in range(binary_search_steps):
        w = w0.clone()
        m1, m2 = torch.zeros_like(w), torch.zeros_like(w)
        succeeded = torch.zeros(B, dtype=torch.bool, device=dev)
        for t in range(1, steps + 1):
            w.requires_grad_(True)
            with torch.enable_grad():
                adv = (torch.tanh(w) + 1) / 2
                logits = model(adv)                                              # (B, K)
                l2 = (adv - x).pow(2).flatten(1).sum(1)                          # (B,)
                real = logits[onehot]                                            # (B,)
                other = logits.masked_fill(onehot, float("-inf")).amax(1)        # (B,)
                loss = (l2 + const * (real - other + confidence).clamp(min=0)).sum()
                (grad,) = torch.autograd.grad(loss, [w])
            w = w.detach()
            with torch.no_grad():
                # Score the point the loss was computed at, before the step moves it.
                is_adv = (other - real) > confidence
                succeeded |= is_adv
                better = is_adv & (l2 < best_l2)
                best_l2 = torch.where(better, l2, best_l2)
                best[better] = adv[better].detach()
                w = _adam_step(w, grad, m1, m2, t, lr)
        with torch.no_grad():
            const, lower, upper = _bisect_const(const, lower, upper, succeeded)
    return best.clamp(0.0, 1.0).detach()


class BPDAPurifier(nn.Module):
    """The purifier as an attacker differentiates it: forward runs the projection,
    backward is the identity (straight-through), so d purify(x) / dx = I.

    Each call draws fresh restarts: from ``seed + call`` when a seed is given (reproducible
    runs), else from the OS. An EOT batch (x repeated k times) thus gets k independent
    projections, because each row of a batch has its own starting latents.
    """

    def __init__(self, generator: nn.Module, cfg: ProjectionConfig, encoder: nn.Module | None = None,
                 seed: int | None = None):
        super().__init__()
        self.generator, self.encoder, self.cfg, self.seed = generator, encoder, cfg, seed
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seed = None if self.seed is None else self.seed + self.calls
        self.calls += 1
        purified = project(self.generator, x.detach(), self.cfg.with_(seed=seed), self.encoder).images
        return x + (purified - x).detach()   # value: purified; gradient: identity


def defended(classifier: nn.Module, purifier: nn.Module) -> nn.Module:
    """classifier(purifier(x)) as one module, the thing the adaptive attack differentiates."""
    return nn.Sequential(purifier, classifier)


def bpda_eot_pgd(classifier: nn.Module, generator: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 eps: float, cfg: ProjectionConfig, encoder: nn.Module | None = None,
                 steps: int = 40, eot_samples: int = 4, step_size: float | None = None,
                 seed: int | None = None) -> torch.Tensor:
    """PGD-Linf on classifier(purify(x)) with BPDA gradients averaged over ``eot_samples``
    independent projections per step. Costs steps * eot_samples projections per image."""
    model = defended(classifier, BPDAPurifier(generator, cfg, encoder, seed))
    gen = None
    if seed is not None:
        gen = torch.Generator(device=x.device).manual_seed(seed)
    return pgd_linf(model, x, y, eps, steps=steps, step_size=step_size, random_start=True,
                    generator=gen, eot_samples=eot_samples)


# --- the black-box substitute (Papernot et al. 2017) ---------------------------------------

def jacobian_augmentation(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, lam: float,
                          batch_size: int = 512) -> torch.Tensor:
    """The new points of one augmentation: x + lam * sign(d softmax(model(x))[label] / dx) (N, C, H, W).

    As cleverhans 2's ``jacobian_augmentation`` with the Defense-GAN models (which end in a
    softmax): the Jacobian of the substitute's *probability* of the oracle's label, and the new
    points are not clipped to [0, 1]. Where that probability saturates in float32 the gradient
    is exactly 0 and the "new" point repeats the old one, as in the original.
    """
    was_training = model.training
    model.eval()
    out = []
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size].detach().requires_grad_(True)               # (b, C, H, W)
        with torch.enable_grad():
            probs = torch.softmax(model(xb), dim=1)                          # (b, K)
            # Each row depends on its own input only (no batch norm), so one backward of the
            # sum gives every point's own gradient.
            picked = probs.gather(1, labels[s:s + batch_size].view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(picked, xb)
        out.append((xb + lam * grad.sign()).detach())
    model.train(was_training)
    return torch.cat(out)


def train_epochs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int,
                 lr: float, generator: torch.Generator) -> None:
    """``epochs`` passes of Adam on cross-entropy over (x, y), shuffled by ``generator``, dropout
    on; a fresh optimizer per call (cleverhans' ``model_train`` builds a new one each round)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=generator).to(x.device)
        for s in range(0, len(y), batch_size):
            idx = perm[s:s + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


def papernot_substitute(model: nn.Module, oracle, x0: torch.Tensor, y0: torch.Tensor, rounds: int = 6,
                        lam: float = 0.1, epochs: int = 10, batch_size: int = 128, lr: float = 1e-3,
                        seed: int = 0, log=None) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Train ``model`` (untrained, the substitute's architecture) as Papernot et al.'s substitute.

    ``x0`` (N0, C, H, W) is the attacker's own data with labels ``y0`` (N0,); ``oracle(x, round)``
    returns the black box's labels (N,) for new points x. Each of ``rounds`` rounds trains the
    substitute for ``epochs`` epochs on the set so far; between rounds the set doubles by
    :func:`jacobian_augmentation` of every point and the oracle labels the new half. So the
    oracle answers N0 * (2^(rounds-1) - 1) queries here and the last round trains on
    N0 * 2^(rounds-1) points (150 and 6 rounds: 4,650 and 4,800). The weights carry over
    between rounds (the original's ``init_all=False``). Returns (substitute in eval mode, the
    final training set, its labels).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    gen = torch.Generator().manual_seed(seed)
    devices = [x0.device.index or 0] if x0.device.type == "cuda" else []
    x, y = x0.detach(), y0.detach()
    with torch.random.fork_rng(devices=devices):   # dropout draws, seeded, the caller's RNG untouched
        torch.manual_seed(seed)
        for rnd in range(rounds):
            train_epochs(model, x, y, epochs, batch_size, lr, gen)
            if log:
                log(f"substitute round {rnd + 1}/{rounds}: trained on {len(y)} points")
            if rnd < rounds - 1:
                new = jacobian_augmentation(model, x, y, lam)                # (N, C, H, W)
                labels = oracle(new, rnd).to(y.device, torch.int64)          # (N,)
                x, y = torch.cat([x, new]), torch.cat([y, labels])
    return model.eval(), x, y


# --- attacks that also evade the detector (issue 13) ---------------------------------------

def _margin(logits: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    """min(max_{j != y} Z_j - Z_y, kappa) (N,): positive when misclassified, capped at kappa so
    that once an image is wrong by kappa the other terms of the loss take over."""
    onehot = F.one_hot(y, num_classes=logits.shape[1]).bool()
    real = logits[onehot]                                                    # (N,)
    other = logits.masked_fill(onehot, float("-inf")).amax(1)                # (N,)
    return (other - real).clamp(max=kappa)


def bpda_eot_detect_pgd(classifier: nn.Module, generator: nn.Module, x: torch.Tensor, y: torch.Tensor,
                        eps: float, cfg: ProjectionConfig, threshold: float, lam: float,
                        encoder: nn.Module | None = None, steps: int = 40, eot_samples: int = 4,
                        step_size: float | None = None, kappa: float = 2.0, seed: int | None = None,
                        select: bool = True) -> torch.Tensor:
    """Detection-aware BPDA+EOT PGD-Linf: the attacker wants the purified image misclassified
    *and* the reconstruction error under the detector's ``threshold``.

    Each step ascends, averaged over ``eot_samples`` independent projections P_k = G(z*_k) of x',

        margin(classifier(P_k), y) - lam * ||P_k - x'||^2 / (D * threshold)

    (``margin``: :func:`_margin`, capped at ``kappa``; D pixels, so the second term is the
    service's reconstruction error in units of its threshold). The margin's gradient goes
    through the projection as the identity (BPDA); the error's gradient is the exact one with
    z* held constant, 2 (x' - P_k) / (D * threshold), which is BPDA-consistent: by the
    envelope theorem it is also the gradient of min_z ||G(z) - x'||^2 at an exact minimiser.

    With ``select`` the attacker returns, per image, the iterate (steps 0..steps) whose EOT
    draws were most often both misclassified and under the threshold (ties: the later one; so
    with no such draw anywhere it returns the last iterate, as plain PGD). This uses only the
    projections the attack ran anyway. Costs (steps + 1) * eot_samples projections per image.
    """
    if step_size is None:
        step_size = 2.5 * eps / max(steps, 1)
    x = x.detach()
    B, k, D = x.shape[0], eot_samples, x[0].numel()
    lo, hi = (x - eps).clamp(min=0.0), (x + eps).clamp(max=1.0)
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed) if seed is not None else gen.seed()
    noise = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    x_adv = torch.max(torch.min(x + (2 * noise - 1) * eps, hi), lo)
    best, best_score = x_adv.clone(), torch.full((B,), -1.0, device=x.device)
    yr = y.repeat(k)                                                         # (k*B,)
    for t in range(steps + 1):
        xr = x_adv.repeat(k, 1, 1, 1)                                        # (k*B, C, H, W)
        pseed = None if seed is None else seed + 1 + t
        proj = project(generator, xr, cfg.with_(seed=pseed), encoder)
        purified = proj.images.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = classifier(purified)                                    # (k*B, K)
            (g_margin,) = torch.autograd.grad(_margin(logits, yr, kappa).sum(), purified)
        with torch.no_grad():
            evaded = (logits.argmax(1) != yr) & (proj.errors <= threshold)   # (k*B,)
            score = evaded.float().view(k, B).mean(0)                        # (B,)
            better = score >= best_score
            best[better], best_score[better] = x_adv[better], score[better]
            if t == steps:
                break
            grad = g_margin
            if lam:   # (skipped at lambda 0, so that threshold 0 or inf gives no 0 * inf)
                grad = grad - lam * 2 * (xr - proj.images) / (D * threshold)  # d err/thr / dx', z* fixed
            grad = grad.view(k, *x.shape).mean(0)                             # (B, C, H, W)
            x_adv = torch.max(torch.min(x_adv + step_size * grad.sign(), hi), lo)
    return (best if select else x_adv).detach()


def on_manifold(classifier: nn.Module, generator: nn.Module, x: torch.Tensor, y: torch.Tensor,
                cfg: ProjectionConfig, encoder: nn.Module | None = None, steps: int = 100,
                search_steps: int = 3, initial_const: float = 1.0, lr: float = 0.05, kappa: float = 2.0,
                seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The on-manifold attack on Defense-GAN of Athalye, Carlini & Wagner 2018 (section 5.4.2):
    search the latent space for z with G(z) misclassified and close to x,

        min_z ||G(z) - x||^2 + c * max(Z_y - max_{j != y} Z_j + kappa, 0)   (Z: classifier(G(z))),

    and submit G(z) itself: it lies on the generator's range, so the projection finds it again
    (small reconstruction error, not flagged) and the classifier sees it nearly unchanged.

    z starts at the projection of x (``cfg``, the defense's own search) and stays on its latent
    sphere when ``cfg.latent_radius`` is set; Adam for ``steps`` per constant, c binary-searched
    per image over ``search_steps`` rounds (x10 while no success), as :func:`cw_l2`. Returns
    (G(z) (B, C, H, W), found (B,) bool): the closest G(z) wrong by >= kappa, or, where none
    was, the last round's G(z) with found False. Not bounded in L-inf.
    """
    x = x.detach()
    B, dev = x.shape[0], x.device
    z0 = project(generator, x, cfg.with_(seed=seed), encoder).latents.detach()  # (B, D)
    radius = cfg.latent_radius * math.sqrt(z0.shape[1]) if cfg.latent_radius else None
    const = torch.full((B,), initial_const, device=dev)
    lower, upper = torch.zeros(B, device=dev), torch.full((B,), float("inf"), device=dev)
    best_l2 = torch.full((B,), float("inf"), device=dev)
    with torch.no_grad():
        best = generator(z0)
    last = best
    for _ in range(search_steps):
        z = z0.clone()
        m1, m2 = torch.zeros_like(z), torch.zeros_like(z)
        succeeded = torch.zeros(B, dtype=torch.bool, device=dev)
        for t in range(1, steps + 1):
            z.requires_grad_(True)
            with torch.enable_grad():
                img = generator(z)                                           # (B, C, H, W)
                l2 = (img - x).pow(2).flatten(1).sum(1)                      # (B,)
                wrong_by = _margin(classifier(img), y, float("inf"))         # (B,)
                loss = (l2 + const * (kappa - wrong_by).clamp(min=0)).sum()
                (grad,) = torch.autograd.grad(loss, [z])
            z = z.detach()
            with torch.no_grad():
                ok = wrong_by >= kappa                                       # scored before the step
                succeeded |= ok
                better = ok & (l2 < best_l2)
                best_l2 = torch.where(better, l2, best_l2)
                best[better] = img[better].detach()
                z = _adam_step(z, grad, m1, m2, t, lr)
                if radius is not None:
                    z = z * (radius / z.norm(dim=1, keepdim=True).clamp_min(1e-12))
        with torch.no_grad():
            last = generator(z)
            const, lower, upper = _bisect_const(const, lower, upper, succeeded)
    found = torch.isfinite(best_l2)
    out = torch.where(found.view(B, 1, 1, 1), best, last)
    return out.clamp(0.0, 1.0).detach(), found
