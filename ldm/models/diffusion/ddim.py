"""DDIM sampling with classifier-free guidance, optionally with a FasterDiffusion plan."""
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.util import autocast


def make_ddim_timesteps(num_ddim_timesteps, num_ddpm_timesteps=1000):
    """Upstream's uniform DDIM schedule: every c-th DDPM timestep plus one, c = T // S.

    Upstream silently runs more than S steps when S does not divide T evenly (S=300 runs 334);
    here that is an error.
    """
    if not 1 <= num_ddim_timesteps <= num_ddpm_timesteps:
        raise ValueError(f"number of DDIM steps must be in 1..{num_ddpm_timesteps}, not {num_ddim_timesteps}")
    timesteps = np.arange(0, num_ddpm_timesteps, num_ddpm_timesteps // num_ddim_timesteps) + 1
    if len(timesteps) != num_ddim_timesteps:
        valid = [s for s in (10, 20, 25, 40, 50, 100, 125, 200, 250, 500) if s <= num_ddpm_timesteps]
        raise ValueError(
            f"{num_ddim_timesteps} DDIM steps do not fit the uniform schedule: upstream would run "
            f"{len(timesteps)} steps (one every {num_ddpm_timesteps // num_ddim_timesteps} timesteps); "
            f"choose S with len(range(0, {num_ddpm_timesteps}, {num_ddpm_timesteps}//S)) == S, e.g. {valid}")
    return timesteps


# Upstream sample() arguments that are accepted at their default values only.
UPSTREAM_DEFAULTS = {"normals_sequence": None, "quantize_x0": False, "mask": None, "x0": None, "temperature": 1.0,
                     "noise_dropout": 0.0, "score_corrector": None, "corrector_kwargs": None}


@dataclass
class SamplerStats:
    """What the UNet ran during one sampling call."""
    steps: int = 0
    encoder_passes: int = 0
    encoder_rows: int = 0
    decoder_calls: int = 0
    decoder_rows: int = 0


def randn(shape, generator=None, device="cpu"):
    """Standard normal noise; with a list of generators, row i is drawn from generator i."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} rows")
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator]).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def ddim_step(x, eps, a_t, a_prev, sigma_t, noise=None):
    """One DDIM update from x_t to x_prev given the predicted noise; returns (x_prev, pred_x0)."""
    pred_x0 = (x - (1.0 - a_t).sqrt() * eps) / a_t.sqrt()
    dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * eps
    x_prev = a_prev.sqrt() * pred_x0 + dir_xt
    if noise is not None:
        x_prev = x_prev + sigma_t * noise
    return x_prev, pred_x0


class DDIMSampler:
    def __init__(self, model, schedule="linear", **kwargs):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps  # `schedule` is accepted for upstream compatibility

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0.0, verbose=False):
        """Per-step float32 scalars: alpha-bar, the previous alpha-bar (alpha-bar[0] before the first), sigma."""
        if ddim_discretize != "uniform":
            raise NotImplementedError(f"DDIM discretization {ddim_discretize!r} is not supported")
        self.ddim_timesteps = make_ddim_timesteps(ddim_num_steps, self.ddpm_num_timesteps)
        alphas_cumprod = self.model.alphas_cumprod.detach().float().cpu()
        self.ddim_alphas = alphas_cumprod[self.ddim_timesteps]
        self.ddim_alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.ddim_timesteps[:-1]]])
        a, a_prev = self.ddim_alphas.double(), self.ddim_alphas_prev.double()
        self.ddim_sigmas = (ddim_eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()).float()
        if verbose:
            print(f"Selected timesteps for ddim sampler: {self.ddim_timesteps}")

    @torch.inference_mode()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, img_callback=None, eta=0.0,
               x_T=None, log_every_t=100, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               verbose=False, faster_diffusion=None, generator=None, precision="fp32", progress=False, **kwargs):
        """Sample a batch; returns (x_0 latents, intermediates with 'x_inter', 'pred_x0' and 'stats')."""
        for key, value in kwargs.items():
            if key not in UPSTREAM_DEFAULTS:
                raise TypeError(f"DDIMSampler.sample got an unexpected argument {key!r}")
            default = UPSTREAM_DEFAULTS[key]
            if not (value is default or (default is not None and not torch.is_tensor(value) and value == default)):
                raise NotImplementedError(f"DDIMSampler.sample supports {key}={default!r} only, not {value!r}")
        if conditioning is not None:
            rows = len(next(iter(conditioning.values()))) if isinstance(conditioning, dict) else conditioning.shape[0]
            if rows != batch_size:
                raise ValueError(f"got {rows} conditionings for batch size {batch_size}")
        if faster_diffusion is not None and self.model.conditioning_key not in ("crossattn", None):
            raise NotImplementedError("FasterDiffusion supports cross-attention conditioning only")
        self.make_schedule(S, ddim_eta=eta, verbose=verbose)
        device = self.model.device
        if x_T is None:
            x_T = randn((batch_size, *shape), generator, device)
        x_T = x_T.to(device=device, dtype=torch.float32)
        return self.ddim_sampling(conditioning, x_T, faster_diffusion, unconditional_guidance_scale,
                                  unconditional_conditioning, generator, precision, callback, img_callback,
                                  log_every_t, progress)

    def ddim_sampling(self, cond, x_T, fd, scale, uncond, generator, precision, callback, img_callback,
                      log_every_t, progress):
        num_steps = len(self.ddim_timesteps)
        timesteps = np.flip(self.ddim_timesteps)  # loop index i -> DDPM timestep, noisiest first
        guided = uncond is not None and scale != 1.0
        stats = SamplerStats()
        intermediates = {"x_inter": [x_T], "pred_x0": [x_T], "stats": stats}
        groups = fd.groups(num_steps) if fd is not None else [(i, i + 1) for i in range(num_steps)]
        bar = tqdm(total=num_steps, desc="DDIM", disable=not progress, leave=False)
        x = x_T
        for start, stop in groups:
            eps_calls = self.predict_group(x, timesteps[start:stop], cond, uncond if guided else None, fd,
                                           precision, stats)
            for i, eps in zip(range(start, stop), eps_calls):
                if guided:
                    e_u, e_c = eps.float().chunk(2)
                    eps = e_u + scale * (e_c - e_u)
                index = num_steps - 1 - i
                noise = None
                if self.ddim_sigmas[index] > 0:
                    noise = randn(x.shape, generator, x.device)
                x, pred_x0 = ddim_step(x, eps.float(), *(v[index].to(x.device) for v in
                                       (self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas)), noise)
                if fd is not None and fd.injects_at(int(timesteps[i])):
                    x = x + fd.injection_scale * x_T
                stats.steps += 1
                if index % log_every_t == 0 or index == num_steps - 1:
                    intermediates["x_inter"].append(x)
                    intermediates["pred_x0"].append(pred_x0)
                if callback:
                    callback(i)
                if img_callback:
                    img_callback(pred_x0, i)
                bar.update(1)
        bar.close()
        return x, intermediates

    def predict_group(self, x, group_timesteps, cond, uncond, fd, precision, stats):
        """Noise predictions for the steps of one group, yielded step by step (guidance rows stacked)."""
        x_in = torch.cat([x, x]) if uncond is not None else x
        c_in = _cat_cond(uncond, cond) if uncond is not None else cond
        rows = x_in.shape[0]
        t_key = torch.full((rows,), int(group_timesteps[0]), device=x.device, dtype=torch.long)
        if fd is None:
            stats.encoder_passes += 1
            stats.encoder_rows += rows
            stats.decoder_calls += 1
            stats.decoder_rows += rows
            with autocast(precision, x.device):
                eps = self.model.apply_model(x_in, t_key, c_in)
            yield eps
            return
        unet = self.model.unet
        with autocast(precision, x.device):
            skips, mid = unet.encode(x_in, t_key, c_in)
        stats.encoder_passes += 1
        stats.encoder_rows += rows
        n = len(group_timesteps)
        context = _group_context(c_in, n, uncond is not None, fd.context_layout)
        per_call = fd.steps_per_call(n, rows)
        for first in range(0, n, per_call):
            last = min(first + per_call, n)
            t_rows = torch.as_tensor(np.repeat(group_timesteps[first:last].copy(), rows), device=x.device)
            ctx = context[first * rows:last * rows] if context is not None else None
            with autocast(precision, x.device):
                eps = unet.decode(skips, mid, t_rows, ctx)
            stats.decoder_calls += 1
            stats.decoder_rows += eps.shape[0]
            yield from eps.split(rows)


def _cat_cond(uncond, cond):
    if isinstance(cond, dict):
        return {k: [torch.cat([u, c]) for u, c in zip(uncond[k], cond[k])] for k in cond}
    return torch.cat([uncond, cond])


def _group_context(c_in, n, guided, layout):
    """Context rows for n decoded steps, step-major: row j*M + k belongs to feature row k.

    "paired" gives row k its own context. "reference" reproduces the published fork, which stacks
    features as [uncond rows for all steps; cond rows for all steps] but tiles the context as
    [uc; c; uc; c; ...]: its row r = branch*n*B + j*B + b receives c_in[r mod 2B].
    """
    if c_in is None:
        return None
    rows = c_in.shape[0]
    if layout == "paired" or not guided or n == 1:
        return c_in.repeat(n, *([1] * (c_in.dim() - 1)))
    batch = rows // 2
    step = torch.arange(n).repeat_interleave(rows)
    k = torch.arange(rows).repeat(n)
    branch, sample = k // batch, k % batch
    return c_in[(branch * n * batch + step * batch + sample) % rows]
