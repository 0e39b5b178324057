"""Noise schedules as the solvers read them: LDM's DDIM timesteps and DPM-Solver's discrete-time VP schedule."""
import numpy as np
import torch

DPM_SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")


def make_ddim_timesteps(num_ddim_timesteps, num_ddpm_timesteps=1000):
    """Upstream's uniform DDIM schedule: every c-th DDPM timestep plus one, c = T // S.

    Upstream silently runs more than S steps when S does not divide T evenly (S=300 runs 334);
    here that is an error.
    """
    if not 1 <= num_ddim_timesteps <= num_ddpm_timesteps:
        raise ValueError(f"number of DDIM steps must be in 1..{num_ddpm_timesteps}, not {num_ddim_timesteps}")
    every = num_ddpm_timesteps // num_ddim_timesteps
    timesteps = np.arange(0, num_ddpm_timesteps, every) + 1
    if timesteps[-1] >= num_ddpm_timesteps:
        problem = f"its last timestep would be {timesteps[-1]}, past the schedule's last, {num_ddpm_timesteps - 1} " \
                  "(upstream fails there)"
    elif len(timesteps) != num_ddim_timesteps:
        problem = f"upstream would run {len(timesteps)} steps (one every {every} timesteps)"
    else:
        return timesteps
    valid = [s for s in (10, 20, 25, 40, 50, 100, 125, 200, 250, 500) if s <= num_ddpm_timesteps]
    raise ValueError(f"{num_ddim_timesteps} DDIM steps do not fit the uniform schedule: {problem}; choose S with "
                     f"len(range(0, {num_ddpm_timesteps}, {num_ddpm_timesteps}//S)) == S, e.g. {valid}")


def ddim_parameters(alphas_cumprod, ddim_timesteps, eta):
    """Float32 alpha-bar, previous alpha-bar (alpha-bar[0] before the first step) and sigma per DDIM step,
    in timestep order, as upstream's make_schedule."""
    alphas_cumprod = alphas_cumprod.detach().float().cpu()
    alphas = alphas_cumprod[ddim_timesteps]
    alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[ddim_timesteps[:-1]]])
    a, a_prev = alphas.double(), alphas_prev.double()
    sigmas = (eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()).float()
    return alphas, alphas_prev, sigmas


def max_ddim_eta(alphas_cumprod, ddim_timesteps):
    """The largest eta whose DDIM noise fits every step: sigma^2 <= 1 - alpha-bar_prev, past which the direction
    term's square root is NaN. At least 1 (DDPM's posterior noise) for any schedule."""
    alphas, alphas_prev, _ = ddim_parameters(alphas_cumprod, ddim_timesteps, 1.0)
    a, a_prev = alphas.double(), alphas_prev.double()
    limits = ((1 - a) / (1 - a / a_prev)).sqrt()
    return float(limits[a < a_prev].min()) if bool((a < a_prev).any()) else float("inf")


def interpolate(x, xp, yp):
    """Piecewise-linear y(x) through the points (xp, yp), xp increasing, extended linearly beyond both ends
    (DPM-Solver's interpolate_fn)."""
    k = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    x0, x1, y0, y1 = xp[k - 1], xp[k], yp[k - 1], yp[k]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class NoiseScheduleVP:
    """DPM-Solver's discrete-time schedule: log alpha_t = log(alpha-bar_k) / 2 at t_k = (k + 1) / N, linear
    in between (float32); continuous time runs from T = 1 down to 1 / N.

    As upstream, the noisy end is cut where lambda = log(alpha_t / sigma_t) falls below -5.1 (LDM's linear
    schedule never does).
    """

    def __init__(self, alphas_cumprod, clipped_lambda=-5.1):
        log_alphas = 0.5 * torch.log(alphas_cumprod.detach().float())
        lambdas = log_alphas - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alphas))
        cut = int(torch.searchsorted(torch.flip(lambdas, [0]), clipped_lambda))
        self.log_alpha_array = log_alphas[:len(log_alphas) - cut]
        self.total_N = len(self.log_alpha_array)
        self.t_array = torch.linspace(0.0, 1.0, self.total_N + 1)[1:].to(log_alphas.device)
        self.T = 1.0

    def marginal_log_mean_coeff(self, t):
        return interpolate(t.reshape(-1), self.t_array, self.log_alpha_array)

    def marginal_alpha(self, t):
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t):
        return torch.sqrt(1.0 - torch.exp(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t):
        log_mean_coeff = self.marginal_log_mean_coeff(t)
        return log_mean_coeff - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_mean_coeff))

    def inverse_lambda(self, lamb):
        log_alpha = -0.5 * torch.logaddexp(torch.zeros(1).to(lamb), -2.0 * lamb)
        increasing_log_alphas, times = torch.flip(self.log_alpha_array, [0]), torch.flip(self.t_array, [0])
        return interpolate(log_alpha.reshape(-1), increasing_log_alphas, times)

    def model_time(self, t):
        """The timestep the UNet receives at continuous time t: (t - 1/N) * 1000, a float."""
        return (t - 1.0 / self.total_N) * 1000.0

    def time_steps(self, skip_type, steps):
        """steps + 1 continuous times from T down to 1/N, spaced as DPM-Solver's get_time_steps."""
        t_T, t_0 = self.T, 1.0 / self.total_N
        device = self.t_array.device
        if skip_type == "time_uniform":
            return torch.linspace(t_T, t_0, steps + 1).to(device)
        if skip_type == "logSNR":
            lambda_T = self.marginal_lambda(torch.tensor(t_T).to(device))
            lambda_0 = self.marginal_lambda(torch.tensor(t_0).to(device))
            lambdas = torch.linspace(lambda_T.cpu().item(), lambda_0.cpu().item(), steps + 1).to(device)
            return self.inverse_lambda(lambdas)
        if skip_type == "time_quadratic":
            return torch.linspace(t_T ** 0.5, t_0 ** 0.5, steps + 1).pow(2).to(device)
        raise ValueError(f"unknown DPM-Solver skip_type {skip_type!r}; choose one of {', '.join(DPM_SKIP_TYPES)}")
