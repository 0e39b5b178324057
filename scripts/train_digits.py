"""Train the small digits LDM in plain PyTorch: the VQ-f4 first stage, then the UNet on its latents.

    python scripts/train_digits.py first_stage --data data/digits_train.npz --minutes 15
    python scripts/train_digits.py unet --data data/digits_train.npz --minutes 60
    python scripts/train_digits.py export --out models/digits32

`first_stage --decoder_only` goes on training the first stage's decoder alone (encoder and codebook frozen, so
the latents do not change), keeping an EMA of its weights (--ema_decay); it can run beside the UNet stage, and
`export` takes the latest decoder's EMA weights.
Each stage saves a checkpoint to --workdir every --save_every steps (and when stopped with Ctrl-C) and resumes
from it when run again; a stage ends at --steps or after --minutes of training, whichever comes first.
A stage already at --steps (or run with --minutes 0) says so and exits.
`export` writes the EMA weights in the upstream state_dict layout as model.safetensors, beside a config.yaml
that carries the measured latent scale factor; `ldm.util.load_model` reads the pair strictly.
Bad input (flags, files, a missing earlier stage) is one `error: ...` line and exit status 2, before training.
"""
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from ldm import cli
from ldm.data.digits import read_set
from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import ResBlock
from ldm.sampling import from_uint8, image_shape
from ldm.util import check_file, instantiate_from_config, write_atomic

DEFAULT_CONFIG = "configs/latent-diffusion/digits32.yaml"


def build_model(config_path, seed):
    """The LatentDiffusion of the config with upstream's initialisation (zeroed residual outputs)."""
    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.load(config_path).model)
    unet = model.model.diffusion_model
    for module in unet.modules():
        if isinstance(module, ResBlock):
            torch.nn.init.zeros_(module.out_layers[-1].weight)
            torch.nn.init.zeros_(module.out_layers[-1].bias)
        elif isinstance(module, SpatialTransformer):
            torch.nn.init.zeros_(module.proj_out.weight)
            torch.nn.init.zeros_(module.proj_out.bias)
    torch.nn.init.zeros_(unet.out[-1].weight)
    torch.nn.init.zeros_(unet.out[-1].bias)
    return model


def load_images(path, shape):
    """uint8 NHWC images of shape (height, width, channels) and int64 labels of an ADM-format .npz; a file that
    is not one is a UsageError."""
    try:
        images, labels = read_set(path)
    except (OSError, ValueError) as e:
        raise cli.UsageError(f"--data {e}") from None
    if images.shape[1:] != shape:
        raise cli.UsageError(f"--data {path} holds {'x'.join(map(str, images.shape[1:]))} images; the config's model "
                             f"takes {'x'.join(map(str, shape))}")
    return torch.from_numpy(images), torch.from_numpy(labels).long()


class EMA:
    """Exponential moving average of parameters, with upstream LDM's warm-up of the decay."""

    def __init__(self, params, decay):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def load(self, shadow):
        """Resume from saved shadow weights, one tensor per parameter."""
        for s, v in zip(self.shadow, shadow, strict=True):
            s.copy_(v)

    @torch.no_grad()
    def update(self, step):
        decay = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p, 1 - decay)


def optimizer_steps(opt):
    """Steps this optimizer has taken (AdamW counts them per parameter), whatever the training step it began at."""
    state = opt.state.get(opt.param_groups[0]["params"][0])
    return int(state["step"]) if state else 0


def save_checkpoint(path, **state):
    """Write a checkpoint atomically, making its folder (--workdir) if need be."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save(state, f))


def vq_losses(first_stage, images, beta=0.25):
    """Reconstruction (L1 + L2), codebook and commitment losses of the VQ autoencoder on images in [-1, 1]."""
    h = first_stage.encode(images)
    z = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    codes = first_stage.quantize.embedding.weight
    indices = torch.cdist(z, codes).argmin(dim=1)
    q = codes[indices].view(h.shape[0], h.shape[2], h.shape[3], -1).permute(0, 3, 1, 2)
    codebook = F.mse_loss(q, h.detach())
    commitment = F.mse_loss(h, q.detach())
    reconstruction = first_stage.decode(h + (q - h).detach(), force_not_quantize=True)
    rec = F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images)
    return rec, codebook + beta * commitment, h.detach(), indices


def decoder_parameters(first_stage):
    """What --decoder_only trains: everything after the quantizer."""
    return list(first_stage.post_quant_conv.parameters()) + list(first_stage.decoder.parameters())


@torch.no_grad()
def restart_dead_codes(codebook, latents, usage):
    """Move codes unused since the last restart onto random recent encoder outputs."""
    dead = (usage == 0).nonzero().flatten()
    if len(dead):
        pick = torch.randint(len(latents), (len(dead),))
        codebook[dead] = latents[pick] + 0.01 * torch.randn_like(latents[pick])
    usage.zero_()
    return len(dead)


def nothing_to_train(stage, step, args):
    """The line that says why a stage has no step to run (--steps reached, or --minutes 0); None if it has."""
    if step >= args.steps:
        return f"{stage}: already at step {step} of --steps {args.steps}: nothing to train (raise --steps to go on)"
    if args.minutes <= 0:
        return f"{stage}: --minutes {args.minutes:g} leaves no time to train; still at step {step}"
    return None


def out_of_time(start, args):
    """Whether --minutes have passed since start."""
    return time.time() - start >= args.minutes * 60


def train_first_stage(args):
    model = build_model(args.config, args.seed)
    first_stage = model.first_stage_model.train()
    trained = decoder_parameters(first_stage) if args.decoder_only else list(first_stage.parameters())
    opt = torch.optim.Adam(trained, lr=args.lr or 2e-4, betas=(0.5, 0.9))
    ckpt = Path(args.workdir) / "first_stage.pt"
    step = 0
    decoder_ema = None
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        first_stage.load_state_dict(state["model"])
        if state.get("decoder_only", False) == args.decoder_only:
            opt.load_state_dict(state["opt"])
            for group in opt.param_groups:  # the saved state carries the old run's learning rate
                group["lr"] = args.lr or 2e-4
        step = state["step"]
        decoder_ema = state.get("decoder_ema")
        print(f"resumed first stage at step {step}" + (" (decoder only)" if args.decoder_only else ""))
    idle = nothing_to_train("first stage", step, args)
    if idle:
        print(idle)
        return
    images, _ = load_images(args.data, image_shape(model))
    ema = None
    if args.decoder_only:
        first_stage.encoder.requires_grad_(False)
        first_stage.quant_conv.requires_grad_(False)
        first_stage.quantize.requires_grad_(False)
        ema = EMA(trained, args.ema_decay)  # export writes these weights
        if decoder_ema is not None:
            ema.load(decoder_ema)
    gen = torch.Generator().manual_seed(args.seed + step)
    rec = vq = torch.tensor(float("nan"))
    usage = torch.zeros(first_stage.quantize.embedding.num_embeddings, dtype=torch.long)
    recent = []
    start, bar = time.time(), tqdm(initial=step, total=args.steps, desc="first stage")

    def save():
        save_checkpoint(ckpt, model=first_stage.state_dict(), opt=opt.state_dict(), step=step,
                        decoder_only=args.decoder_only, rec=rec.item(),
                        **({"decoder_ema": ema.shadow} if ema is not None else {}))

    try:
        while step < args.steps:
            batch = from_uint8(images[torch.randint(len(images), (args.batch_size,), generator=gen)])
            rec, vq, latents, indices = vq_losses(first_stage, batch)
            loss = rec if args.decoder_only else rec + vq
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            usage += torch.bincount(indices, minlength=len(usage))
            recent = (recent + [latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])])[-8:]
            step += 1
            if ema is not None:
                ema.update(step)
            if step % 200 == 0 and not args.decoder_only:
                dead = restart_dead_codes(first_stage.quantize.embedding.weight.data, torch.cat(recent), usage)
                bar.set_postfix(rec=f"{rec.item():.4f}", vq=f"{vq.item():.4f}", restarted=dead)
            else:
                bar.set_postfix(rec=f"{rec.item():.4f}", vq=f"{vq.item():.4f}")
            bar.update()
            if step % args.save_every == 0:
                save()
            if out_of_time(start, args):
                break
    finally:
        bar.close()
        save()
    print(f"first stage: {step} steps, last reconstruction loss {rec.item():.4f}, vq loss {vq.item():.4f}")


@torch.no_grad()
def encode_dataset(first_stage, images, batch_size=1000):
    """Unquantized latents of all images, as LDM trains its UNet on them."""
    return torch.cat([first_stage.encode(from_uint8(images[i:i + batch_size]))
                      for i in tqdm(range(0, len(images), batch_size), desc="encoding")])


def cached_latents(first_stage, args, path, shape):
    """Latents and labels of the first --num_images training images (of shape (height, width, channels)),
    encoded once and kept in --workdir."""
    key = {"data": args.data, "num_images": args.num_images, "quant_conv": first_stage.quant_conv.weight}
    if path.exists():
        cache = torch.load(path, weights_only=True)
        if (cache["data"], cache["num_images"]) == (args.data, args.num_images) and \
                torch.equal(cache["quant_conv"], key["quant_conv"]):
            return cache["latents"], cache["labels"]
    images, labels = load_images(args.data, shape)
    images, labels = images[:args.num_images], labels[:args.num_images]
    latents = encode_dataset(first_stage, images)
    save_checkpoint(path, latents=latents, labels=labels, **key)
    return latents, labels


def diffusion_loss(model, latents, labels, generator, uncond_class, p_uncond, min_snr=None):
    """The LDM objective: MSE between the noise and the UNet's prediction at uniform random timesteps.

    min_snr: weight each timestep by min(SNR, min_snr) / SNR (Min-SNR weighting, Hang et al. 2023), which
    spends less of the model on the nearly noise-free steps and converges faster; None: plain MSE.
    """
    n = len(latents)
    t = torch.randint(model.num_timesteps, (n,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    drop = torch.rand(n, generator=generator) < p_uncond
    labels = torch.where(drop, torch.full_like(labels, uncond_class), labels)
    a = model.alphas_cumprod[t].view(n, 1, 1, 1)
    x_t = a.sqrt() * latents + (1 - a).sqrt() * noise
    cond = model.cond_stage_model({model.cond_stage_key: labels})
    per_sample = (model.apply_model(x_t, t, cond) - noise).pow(2).mean(dim=(1, 2, 3))
    if min_snr is not None:
        snr = a.flatten() / (1 - a.flatten())
        per_sample = per_sample * snr.clamp(max=min_snr) / snr
    return per_sample.mean()


def start_from_export(args, workdir):
    """Seed --workdir from an exported model: its EMA weights as the UNet's starting point, and its first stage
    unless --workdir already has one (a first stage trained further: the UNet then adapts to its latents).

    Returns (UNet and class-embedder tensors, step); the optimizer starts afresh.
    """
    from safetensors import safe_open
    path = Path(args.init_from) / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        step = int((f.metadata() or {}).get("step", 0))
    if (workdir / "first_stage.pt").exists():
        print(f"keeping the first stage in {workdir}")
    else:
        first_stage = {k.removeprefix("first_stage_model."): v for k, v in tensors.items()
                       if k.startswith("first_stage_model.")}
        save_checkpoint(workdir / "first_stage.pt", model=first_stage, opt={}, step=0, decoder_only=None,
                        rec=float("nan"))
    return {k: v for k, v in tensors.items() if not k.startswith("first_stage_model.")}, step


def train_unet(args):
    workdir = Path(args.workdir)
    start_tensors = None
    if args.init_from and not (workdir / "unet.pt").exists():
        start_tensors, start_step = start_from_export(args, workdir)
    first = torch.load(workdir / "first_stage.pt", weights_only=True)
    model = build_model(args.config, args.seed)
    model.first_stage_model.load_state_dict(first["model"])
    model.first_stage_model.eval().requires_grad_(False)
    latents, labels = cached_latents(model.first_stage_model, args, workdir / "latents.pt", image_shape(model))
    scale_factor = 1.0 / latents.flatten().std().item()
    latents = latents * scale_factor
    uncond_class = model.cond_stage_model.embedding.num_embeddings - 1
    params = list(model.model.parameters()) + list(model.cond_stage_model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr or 2e-4, weight_decay=0.0)
    ema = EMA(params, args.ema_decay)
    ckpt = workdir / "unet.pt"
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        for p, v in zip(params, state["params"]):
            p.data.copy_(v)
        ema.load(state["ema"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"resumed UNet at step {step}")
    elif start_tensors is not None:
        missing, unexpected = model.load_state_dict(start_tensors, strict=False)
        if unexpected or any(not k.startswith("first_stage_model.") for k in missing):
            raise cli.UsageError(f"--init_from {args.init_from} is not a model of {args.config}")
        ema.shadow = [p.detach().clone() for p in params]
        step = start_step
        print(f"started UNet from {args.init_from} (step {step}, fresh optimizer)")
    idle = nothing_to_train("unet", step, args)
    if idle:
        print(idle)
        return
    gen = torch.Generator().manual_seed(args.seed + 1 + step)
    model.model.train()
    start, bar = time.time(), tqdm(initial=step, total=args.steps, desc="unet")
    smoothed = None

    def save():
        save_checkpoint(ckpt, params=[p.detach() for p in params], ema=ema.shadow, opt=opt.state_dict(), step=step,
                        scale_factor=scale_factor, first_stage=first["model"], loss=smoothed)

    try:
        while step < args.steps:
            idx = torch.randint(len(latents), (args.batch_size,), generator=gen)
            loss = diffusion_loss(model, latents[idx], labels[idx], gen, uncond_class, args.p_uncond, args.min_snr)
            warmup = min(1.0, (optimizer_steps(opt) + 1) / 500)  # each fresh optimizer warms up over 500 steps
            for group in opt.param_groups:
                group["lr"] = (args.lr or 2e-4) * warmup
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            ema.update(step)
            smoothed = loss.item() if smoothed is None else 0.99 * smoothed + 0.01 * loss.item()
            bar.set_postfix(loss=f"{smoothed:.4f}")
            bar.update()
            if step % args.save_every == 0:
                save()
            if out_of_time(start, args):
                break
    finally:
        bar.close()
        save()
    print(f"unet: {step} steps, smoothed loss {smoothed:.4f}, latent scale factor {scale_factor:.4f}")


def export(args):
    """Write config.yaml (with the measured scale factor) and model.safetensors (EMA weights) to --out."""
    workdir, out = Path(args.workdir), Path(args.out)
    state = torch.load(workdir / "unet.pt", weights_only=True)
    first = torch.load(workdir / "first_stage.pt", weights_only=True)
    first_stage = first["model"]
    changed = [k for k, v in state["first_stage"].items()
               if not k.startswith(("decoder.", "post_quant_conv.")) and not torch.equal(v, first_stage[k])]
    if changed:
        raise cli.UsageError(f"the first stage's encoder changed after the UNet was trained on it "
                             f"({changed[0]}, ...)")
    model = build_model(args.config, args.seed)
    model.first_stage_model.load_state_dict(first_stage)
    if "decoder_ema" in first:  # the decoder's EMA weights, kept by --decoder_only
        for p, v in zip(decoder_parameters(model.first_stage_model), first["decoder_ema"], strict=True):
            p.data.copy_(v)
    params = list(model.model.parameters()) + list(model.cond_stage_model.parameters())
    for p, v in zip(params, state["ema"]):
        p.data.copy_(v)
    config = OmegaConf.load(args.config)
    config.model.params.scale_factor = float(state["scale_factor"])
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    metadata = {"step": str(state["step"])}
    write_atomic(out / "model.safetensors", lambda f: f.write(_safetensors_bytes(tensors, metadata)))
    write_atomic(out / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(config).encode()))
    print(f"wrote {out}/model.safetensors ({len(tensors)} tensors, step {state['step']}) and {out}/config.yaml "
          f"(scale_factor {state['scale_factor']:.5f})")


def _safetensors_bytes(tensors, metadata):
    from safetensors.torch import save
    return save(tensors, metadata)


def check_at_least(args, minimum, *names):
    """The flags that are given are numbers >= minimum."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value >= minimum:
            raise cli.UsageError(f"--{name} must be at least {minimum}, not {value}")


def check_numbers(args):
    """Counts, durations, rates and fractions are in range."""
    check_at_least(args, 1, "batch_size", "save_every", "num_images", "threads")
    check_at_least(args, 0, "steps", "minutes", "min_snr")
    if args.lr is not None and not 0 < args.lr < math.inf:
        raise cli.UsageError(f"--lr must be a number > 0, not {args.lr}")
    for name in ("ema_decay", "p_uncond"):
        if not 0 <= getattr(args, name) <= 1:
            raise cli.UsageError(f"--{name} must be in 0..1, not {getattr(args, name)}")


def command(stage, args):
    """The command that trains a stage in --workdir."""
    return f"`python scripts/train_digits.py {stage} --workdir {args.workdir}`"


def check_stage_inputs(args):
    """What a stage starts from exists: the earlier stages' checkpoints in --workdir, --init_from, --data."""
    workdir = Path(args.workdir)
    has_first_stage, has_unet = (workdir / "first_stage.pt").is_file(), (workdir / "unet.pt").is_file()
    if args.stage == "first_stage" and args.decoder_only and not has_first_stage:
        raise cli.UsageError(f"--decoder_only continues a trained first stage, and there is none in {workdir}")
    from_export = args.stage == "unet" and args.init_from is not None and not has_unet
    if from_export:
        try:
            check_file(Path(args.init_from) / "model.safetensors", "--init_from: exported model")
        except OSError as e:
            raise cli.UsageError(str(e)) from None
    elif args.stage in ("unet", "export") and not has_first_stage:
        raise cli.UsageError(f"no first stage in {workdir} (first_stage.pt): train it first with "
                             f"{command('first_stage', args)}")
    if args.stage == "export" and not has_unet:
        raise cli.UsageError(f"no UNet in {workdir} (unet.pt): train it first with {command('unet', args)}")
    if args.stage == "first_stage" or (args.stage == "unet" and not (workdir / "latents.pt").is_file()):
        try:
            check_file(args.data, "--data")
        except OSError as e:
            raise cli.UsageError(str(e)) from None


def check_args(args):
    """Everything that can be checked before training starts; bad input is a UsageError."""
    check_numbers(args)
    cli.check_writable_folder(args.workdir, "--workdir")
    if args.stage == "export":
        cli.check_writable_folder(args.out, "--out")
    check_stage_inputs(args)
    cli.inspect_model(args)


@cli.one_line_failures
def main(argv=None):
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("first_stage", "unet", "export"))
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--data", default="data/digits_train.npz", help="training set from scripts/make_digits.py")
    parser.add_argument("--workdir", default="logs/train_digits", help="checkpoints of the stages")
    parser.add_argument("--out", default="models/digits32", help="export: output folder")
    parser.add_argument("--num_images", type=int, default=None, help="unet: train on the first N images (default all)")
    parser.add_argument("--init_from", default=None,
                        help="unet: with no UNet checkpoint in --workdir, start from an exported model folder (EMA weights; "
                             "its first stage unless --workdir has one)")
    parser.add_argument("--steps", type=int, default=10**9, help="stop at this many steps")
    parser.add_argument("--minutes", type=float, default=math.inf, help="stop after this many minutes")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=None, help="default: 2e-4")
    parser.add_argument("--ema_decay", type=float, default=0.9995,
                        help="EMA decay of the UNet's weights, and of the decoder's with --decoder_only")
    parser.add_argument("--min_snr", type=float, default=5.0, help="unet: Min-SNR loss weighting (0: plain MSE)")
    parser.add_argument("--p_uncond", type=float, default=0.1, help="class dropout to the unconditional class")
    parser.add_argument("--decoder_only", action="store_true", help="first_stage: train only the decoder")
    parser.add_argument("--save_every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except cli.UsageError as e:
        return cli.report(e)
    args.min_snr = args.min_snr or None
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with torch.enable_grad():  # whatever the caller's mode (a test run in-process after sampling, say)
            {"first_stage": train_first_stage, "unet": train_unet, "export": export}[args.stage](args)
    except cli.UsageError as e:
        return cli.report(e)
    except KeyboardInterrupt:
        print(f"stopped; the checkpoint in {args.workdir} is saved: run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
