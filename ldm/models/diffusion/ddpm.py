"""LatentDiffusion for inference: noise schedule, conditioning, UNet call and first stage.

Training code of upstream LDM is left out; its config keys are accepted and ignored so that
upstream configs load unchanged.
"""
import numpy as np
import torch
from torch import nn

from ldm.modules.diffusionmodules.util import make_beta_schedule
from ldm.util import instantiate_from_config

# Upstream constructor arguments that only matter for training or logging.
TRAINING_ONLY_KEYS = frozenset({
    "loss_type", "ckpt_path", "ignore_keys", "load_only_unet", "monitor", "use_ema", "log_every_t",
    "clip_denoised", "original_elbo_weight", "l_simple_weight", "scheduler_config",
    "use_positional_encodings", "learn_logvar", "logvar_init", "cond_stage_trainable", "concat_mode",
    "cond_stage_forward", "num_timesteps_cond", "first_stage_key", "make_it_fit", "ucg_training",
    "reset_ema", "reset_num_ema_updates", "load_ema", "use_ema_for_sampling",
})


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` and feeds it the conditioning the config asks for."""

    def __init__(self, diff_model_config, conditioning_key):
        super().__init__()
        if conditioning_key not in (None, "concat", "crossattn", "hybrid"):
            raise NotImplementedError(f"conditioning_key {conditioning_key!r} is not supported")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat=None, c_crossattn=None):
        if self.conditioning_key in ("concat", "hybrid"):
            x = torch.cat([x, *c_concat], dim=1)
        context = torch.cat(c_crossattn, dim=1) if self.conditioning_key in ("crossattn", "hybrid") else None
        return self.diffusion_model(x, t, context=context)


class LatentDiffusion(nn.Module):
    def __init__(self, first_stage_config, cond_stage_config, unet_config, cond_stage_key="image",
                 conditioning_key=None, scale_factor=1.0, scale_by_std=False, timesteps=1000,
                 beta_schedule="linear", given_betas=None, linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3,
                 v_posterior=0.0, parameterization="eps", image_size=256, channels=3, **training_only):
        super().__init__()
        unknown = sorted(set(training_only) - TRAINING_ONLY_KEYS)
        if unknown:
            raise TypeError(f"LatentDiffusion got unknown config keys: {', '.join(unknown)}")
        if parameterization != "eps":
            raise ValueError(f"parameterization {parameterization!r} is not supported: the samplers here take "
                             "noise-predicting (eps) models only")
        if conditioning_key is None:  # upstream's rule
            conditioning_key = "concat" if training_only.get("concat_mode", True) else "crossattn"
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None
        self.image_size = image_size
        self.channels = channels
        self.cond_stage_key = cond_stage_key
        self.conditioning_key = conditioning_key
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s, v_posterior)
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        else:
            self.scale_factor = scale_factor
        self.first_stage_model = instantiate_from_config(first_stage_config)
        if cond_stage_config == "__is_unconditional__":
            self.cond_stage_model = None
        elif cond_stage_config == "__is_first_stage__":
            self.cond_stage_model = self.first_stage_model
        else:
            self.cond_stage_model = instantiate_from_config(cond_stage_config)

    def register_schedule(self, given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s, v_posterior):
        """Schedule buffers, computed in float64 and stored as float32 under upstream names."""
        betas = np.asarray(given_betas, dtype=np.float64) if given_betas is not None else \
            make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        self.config_alphas_cumprod = alphas_cumprod  # the config's schedule, known before any weights (meta device)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = (1 - v_posterior) * betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod) + v_posterior * betas
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - alphas_cumprod_prev) * np.sqrt(alphas) / (1 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))

    @property
    def device(self):
        return self.betas.device

    @property
    def unet(self):
        return self.model.diffusion_model

    @torch.no_grad()
    def get_learned_conditioning(self, c):
        """Conditioning input (e.g. {'class_label': labels}) -> the UNet's context."""
        encode = getattr(self.cond_stage_model, "encode", None)
        return encode(c) if callable(encode) else self.cond_stage_model(c)

    def apply_model(self, x_noisy, t, cond, return_ids=False):
        """Predict the noise in x_noisy at timesteps t; a bare tensor cond is the cross-attention context."""
        if not isinstance(cond, dict):
            key = "c_concat" if self.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond if isinstance(cond, list) else [cond]}
        out = self.model(x_noisy, t, **cond)
        return out[0] if isinstance(out, tuple) and not return_ids else out

    @torch.no_grad()
    def decode_first_stage(self, z, predict_cids=False, force_not_quantize=False):
        """Latents -> images in about [-1, 1]; VQ models quantize the latent first, as upstream."""
        return self.first_stage_model.decode(z / self.scale_factor, force_not_quantize=force_not_quantize)

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_output):
        """encode_first_stage's output -> the scaled latent the UNet works on (upstream's name)."""
        return self.scale_factor * encoder_output
