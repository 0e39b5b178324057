"""DDIM sampling with classifier-free guidance and an optional cache (FasterDiffusion or DeepCache)."""
from functools import partial

import torch

from ldm.models.diffusion.sampler import Sampler, check_upstream_arguments, randn
from ldm.models.diffusion.schedules import ddim_parameters, make_ddim_timesteps
from ldm.models.diffusion.solvers import sample_ddim


class DDIMSampler(Sampler):
    """Upstream's DDIMSampler front end over `solvers.sample_ddim`."""

    name = "DDIM"

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0.0, verbose=False):
        """Upstream's per-step float32 scalars: alpha-bar, the previous alpha-bar (alpha-bar[0] before the
        first step), sigma; in timestep order."""
        if ddim_discretize != "uniform":
            raise NotImplementedError(f"DDIM discretization {ddim_discretize!r} is not supported")
        self.ddim_timesteps = make_ddim_timesteps(ddim_num_steps, self.ddpm_num_timesteps)
        self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas = ddim_parameters(
            self.model.alphas_cumprod, self.ddim_timesteps, ddim_eta)
        if verbose:
            print(f"Selected timesteps for ddim sampler: {self.ddim_timesteps}")

    @torch.inference_mode()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, img_callback=None, eta=0.0, x_T=None,
               log_every_t=100, unconditional_guidance_scale=1.0, unconditional_conditioning=None, verbose=False,
               faster_diffusion=None, cache=None, step_callback=None, generator=None, precision="fp32",
               progress=False, count_flops=False, **kwargs):
        """Sample a batch; returns (x_0 latents, intermediates with 'x_inter', 'pred_x0' and 'stats').

        cache: None or a cache plan (`ldm.models.diffusion.caches`); faster_diffusion= is the older name for a
        FasterDiffusion cache. After every step: callback(step) and img_callback(pred_x0, step) as upstream,
        step_callback(step, timestep, x, pred_x0).
        """
        check_upstream_arguments("DDIMSampler", kwargs)
        if faster_diffusion is not None:
            if cache is not None:
                raise ValueError("pass the cache once: faster_diffusion= or cache=, not both")
            if getattr(faster_diffusion, "name", None) != "fd":
                raise TypeError(f"faster_diffusion takes a FasterDiffusion plan, not {type(faster_diffusion).__name__}"
                                "; pass other caches as cache=")
            cache = faster_diffusion
        self.make_schedule(S, ddim_eta=eta, verbose=verbose)
        device = self.model.device
        alphas, alphas_prev, sigmas = (loop_order(v, device) for v in
                                       (self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas))
        noise = partial(randn, (batch_size, *shape), generator, device)
        solve = partial(sample_ddim, alphas=alphas, alphas_prev=alphas_prev, sigmas=sigmas, noise=noise)
        return self.run(solve, loop_order(self.ddim_timesteps), batch_size, shape, conditioning, x_T=x_T,
                        unconditional_guidance_scale=unconditional_guidance_scale,
                        unconditional_conditioning=unconditional_conditioning, cache=cache, callback=callback,
                        img_callback=img_callback, step_callback=step_callback,
                        log_every_t=log_every_t, generator=generator, precision=precision, progress=progress,
                        count_flops=count_flops)


def loop_order(values, device="cpu"):
    """Per-timestep values (a tensor or array in timestep order) as a tensor in loop order, noisiest first."""
    return torch.as_tensor(values).flip(0).to(device)
