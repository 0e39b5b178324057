"""DPM-Solver++ multistep sampling with classifier-free guidance and an optional cache, on LDM's
discrete-time schedule as the official DPM-Solver runs it."""
from functools import partial

import torch

from ldm.models.diffusion.sampler import Sampler, check_upstream_arguments
from ldm.models.diffusion.schedules import DPM_SKIP_TYPES, NoiseScheduleVP
from ldm.models.diffusion.solvers import sample_dpmpp

ORDERS = (1, 2, 3)


class DPMSolverSampler(Sampler):
    """DPM-Solver++ front end over `solvers.sample_dpmpp`. S steps evaluate the model S times, at continuous
    times T = 1 .. down to (not at) 1/N; the UNet receives the float timestep (t - 1/N) * 1000, and the
    result is x at t = 1/N (alpha-bar[0], where LDM's DDIM also ends)."""

    name = "DPM-Solver++"

    @torch.inference_mode()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, img_callback=None, eta=0.0, x_T=None,
               log_every_t=100, unconditional_guidance_scale=1.0, unconditional_conditioning=None, verbose=False,
               order=2, skip_type="time_uniform", lower_order_final=True, cache=None, step_callback=None,
               generator=None, precision="fp32", progress=False, count_flops=False, **kwargs):
        """Sample a batch; returns (x_0 latents, intermediates with 'x_inter', 'pred_x0' and 'stats').

        order: 1, 2 or 3 (multistep). skip_type: "time_uniform", "logSNR" or "time_quadratic" spacing.
        The callbacks are DDIMSampler.sample's.
        """
        check_upstream_arguments("DPMSolverSampler", kwargs)
        if eta != 0:
            raise ValueError(f"DPM-Solver++ here solves the probability-flow ODE: eta must be 0, not {eta}")
        if order not in ORDERS:
            raise ValueError(f"DPM-Solver++ order must be one of {ORDERS}, not {order!r}")
        if skip_type not in DPM_SKIP_TYPES:
            raise ValueError(f"unknown DPM-Solver skip_type {skip_type!r}; choose one of {', '.join(DPM_SKIP_TYPES)}")
        if not isinstance(S, int) or S < order:
            raise ValueError(f"DPM-Solver++ of order {order} needs at least {order} steps, not {S!r}")
        ns = NoiseScheduleVP(self.model.alphas_cumprod)
        times = ns.time_steps(skip_type, S)
        if verbose:
            print(f"DPM-Solver++ continuous times: {times.tolist()}")
        solve = partial(sample_dpmpp, ns=ns, times=times, order=order, lower_order_final=lower_order_final)
        return self.run(solve, ns.model_time(times[:-1]), batch_size, shape, conditioning, x_T=x_T,
                        unconditional_guidance_scale=unconditional_guidance_scale,
                        unconditional_conditioning=unconditional_conditioning, cache=cache, callback=callback,
                        img_callback=img_callback, step_callback=step_callback,
                        log_every_t=log_every_t, generator=generator, precision=precision, progress=progress,
                        count_flops=count_flops)
