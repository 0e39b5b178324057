"""PLMS sampling (CompVis LDM's pseudo linear multistep) with classifier-free guidance and an optional cache."""
from functools import partial

import torch

from ldm.models.diffusion.ddim import DDIMSampler, loop_order
from ldm.models.diffusion.sampler import check_upstream_arguments
from ldm.models.diffusion.solvers import sample_plms


class PLMSSampler(DDIMSampler):
    """Upstream's PLMSSampler front end over `solvers.sample_plms`: the DDIM schedule and update (eta 0) with
    PLMS's multistep noise.

    The first step evaluates the model twice, the second time on a different x (a trial DDIM step to the
    next timestep). That second evaluation always runs the whole UNet and leaves any cache as it is: a
    cache serves only the one prediction per step that the solver's trajectory goes through.
    """

    name = "PLMS"

    @torch.inference_mode()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, img_callback=None, eta=0.0, x_T=None,
               log_every_t=100, unconditional_guidance_scale=1.0, unconditional_conditioning=None, verbose=False,
               cache=None, step_callback=None, generator=None, precision="fp32", progress=False, count_flops=False,
               **kwargs):
        """Sample a batch; returns (x_0 latents, intermediates with 'x_inter', 'pred_x0' and 'stats').

        The callbacks are DDIMSampler.sample's."""
        check_upstream_arguments("PLMSSampler", kwargs)
        if eta != 0:
            raise ValueError(f"PLMS is deterministic: eta must be 0, not {eta}")
        self.make_schedule(S, ddim_eta=0.0, verbose=verbose)
        device = self.model.device
        solve = partial(sample_plms, alphas=loop_order(self.ddim_alphas, device),
                        alphas_prev=loop_order(self.ddim_alphas_prev, device))
        return self.run(solve, loop_order(self.ddim_timesteps), batch_size, shape, conditioning, x_T=x_T,
                        unconditional_guidance_scale=unconditional_guidance_scale,
                        unconditional_conditioning=unconditional_conditioning, cache=cache, callback=callback,
                        img_callback=img_callback, step_callback=step_callback,
                        log_every_t=log_every_t, generator=generator, precision=precision, progress=progress,
                        count_flops=count_flops)
