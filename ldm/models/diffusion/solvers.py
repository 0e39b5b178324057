"""Solvers, each a small loop over a denoiser (k-diffusion style).

The denoiser `model` is what a sampler builds from the UNet, guidance and a cache:
  model(x, i)                    the noise prediction at loop step i (0 = noisiest); the cache decides what runs
  model.uncached(x, i)           a whole-UNet prediction at step i's timestep that leaves the cache alone
  model.end_step(i, x, pred_x0)  ends step i and returns x (a cache may adjust it; progress is reported)
Per-step parameters come in loop order (noisiest first).
"""
import torch


def ddim_step(x, eps, a_t, a_prev, sigma_t=0.0, noise=None):
    """One DDIM update from x_t to x_prev given the predicted noise; returns (x_prev, pred_x0)."""
    pred_x0 = (x - (1.0 - a_t).sqrt() * eps) / a_t.sqrt()
    dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * eps
    x_prev = a_prev.sqrt() * pred_x0 + dir_xt
    if noise is not None:
        x_prev = x_prev + sigma_t * noise
    return x_prev, pred_x0


def sample_ddim(model, x, alphas, alphas_prev, sigmas, noise=None):
    """DDIM (Song et al. 2021); where sigma > 0 it adds sigma * noise(), a fresh draw each step."""
    for i in range(len(alphas)):
        eps = model(x, i)
        z = noise() if sigmas[i] > 0 else None
        x, pred_x0 = ddim_step(x, eps, alphas[i], alphas_prev[i], sigmas[i], z)
        x = model.end_step(i, x, pred_x0)
    return x


def sample_plms(model, x, alphas, alphas_prev):
    """PLMS (Liu et al. 2022) as in CompVis LDM: a pseudo improved Euler first step (the model twice), then
    Adams-Bashforth of order 2, 3 and 4 on the noise predictions of earlier steps; DDIM updates with eta 0."""
    old_eps = []
    last = len(alphas) - 1
    for i in range(len(alphas)):
        step = (alphas[i], alphas_prev[i])
        eps = model(x, i)
        if len(old_eps) == 0:
            x_next, _ = ddim_step(x, eps, *step)
            eps_prime = (eps + model.uncached(x_next, min(i + 1, last))) / 2
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        old_eps = (old_eps + [eps])[-3:]
        x, pred_x0 = ddim_step(x, eps_prime, *step)
        x = model.end_step(i, x, pred_x0)
    return x


def sample_dpmpp(model, x, ns, times, order=2, lower_order_final=True):
    """DPM-Solver++ multistep (Lu et al. 2022) on data predictions, from times[0] to times[-1]; the first
    steps warm up at orders 1, 2, ..., and with lower_order_final and fewer than 10 steps so do the last."""
    steps = len(times) - 1
    x0s, ts = [], []
    for i in range(steps):
        t = times[i]
        eps = model(x, i)
        x0 = (x - ns.marginal_std(t) * eps) / ns.marginal_alpha(t)
        x0s, ts = (x0s + [x0])[-order:], (ts + [t])[-order:]
        if i + 1 < order:
            step_order = i + 1
        elif lower_order_final and steps < 10:
            step_order = min(order, steps - i)
        else:
            step_order = order
        x = dpmpp_update(ns, x, x0s[-step_order:], ts[-step_order:], times[i + 1])
        x = model.end_step(i, x, x0)
    return x


def dpmpp_update(ns, x, x0s, ts, t):
    """One multistep DPM-Solver++ update (solver type 'dpmsolver') from ts[-1] to t, of order len(x0s) (1-3),
    with the data predictions x0s at the times ts (oldest first), in the official implementation's arithmetic."""
    lambda_t, lambda_0 = ns.marginal_lambda(t), ns.marginal_lambda(ts[-1])
    sigma_0, sigma_t = ns.marginal_std(ts[-1]), ns.marginal_std(t)
    alpha_t = torch.exp(ns.marginal_log_mean_coeff(t))
    h = lambda_t - lambda_0
    phi_1 = torch.expm1(-h)
    m0 = x0s[-1]
    if len(x0s) == 1:
        return sigma_t / sigma_0 * x - alpha_t * phi_1 * m0
    r0 = (lambda_0 - ns.marginal_lambda(ts[-2])) / h
    d1_0 = (1.0 / r0) * (m0 - x0s[-2])
    if len(x0s) == 2:
        return (sigma_t / sigma_0) * x - (alpha_t * phi_1) * m0 - 0.5 * (alpha_t * phi_1) * d1_0
    r1 = (ns.marginal_lambda(ts[-2]) - ns.marginal_lambda(ts[-3])) / h
    d1_1 = (1.0 / r1) * (x0s[-2] - x0s[-3])
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    phi_2 = phi_1 / h + 1.0
    phi_3 = phi_2 / h - 0.5
    return (sigma_t / sigma_0) * x - (alpha_t * phi_1) * m0 + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
