"""FasterDiffusion's UNet FLOPs per image against DDIM's, by decoder cap, without sampling.

The steps of one decoder call share the encoder's features, so the convolutions over the skip features run once a
call (`UNetModel.decode`): a cap (`--max_decoder_batch`) that splits a group into calls of fewer steps makes more
work per image, and how many steps a call holds depends on the batch size. Each kind of UNet call is counted once
on meta tensors (torch.utils.flop_counter: no weights, no arithmetic), then multiplied by how often a run makes it:
the encoder once a group, the decoder once a call of each step count, the whole UNet every DDIM step.

    python benchmarks/fd_flops.py                                   # cin256-v2, ldm250, S=250, batch 178
    python benchmarks/fd_flops.py --batch 64 --caps none,256,512,1024
"""
import argparse
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import build_model, print_table
from ldm.cli import first_line
from ldm.compile import decoder_call_steps
from ldm.models.diffusion.faster_diffusion import FasterDiffusion
from ldm.models.diffusion.guidance import unet_rows
from ldm.sampling import unconditional_class


def counted(call):
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


@torch.inference_mode()
def call_flops(model, rows, decoder_steps):
    """FLOPs of one call on `rows` rows: the whole UNet, the encoder, and the decoder at each step count."""
    unet = model.model.diffusion_model
    x = torch.zeros(rows, model.channels, model.image_size, model.image_size, device="meta")
    t = torch.full((rows,), model.num_timesteps - 1, device="meta")
    labels = torch.full((rows,), unconditional_class(model), device="meta")
    context = model.get_learned_conditioning({model.cond_stage_key: labels})
    skips, mid = unet.encode(x, t, context)
    decoder = {n: counted(lambda: unet.decode(skips, mid, t.repeat(n), context.repeat(n, 1, 1)))
               for n in decoder_steps}
    return counted(lambda: unet(x, t, context)), counted(lambda: unet.encode(x, t, context)), decoder


def flops_per_image(model, plan, num_steps, batch_size, guided):
    """UNet FLOPs per image of DDIM and of DDIM with the FasterDiffusion plan at this batch size."""
    rows = unet_rows(batch_size, guided)
    calls = decoder_call_steps(plan, num_steps, rows)
    whole, encoder, decoder = call_flops(model, rows, sorted(calls))
    fd = len(plan.groups(num_steps)) * encoder + sum(count * decoder[n] for n, count in calls.items())
    return num_steps * whole / batch_size, fd / batch_size


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def caps(text):
    """'none,512,1024' -> [None, 512, 1024]: decoder caps in rows, 'none' for whole groups."""
    try:
        values = [None if c == "none" else int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of row counts or 'none', not {text!r}") from None
    if any(c is not None and c < 1 for c in values):
        raise argparse.ArgumentTypeError(f"caps are positive row counts, not {text!r}")
    return values


def main(args):
    guided = args.scale != 1
    rows = []
    try:
        model = build_model(args.config, device="meta")
        for max_rows in args.caps:
            plan = FasterDiffusion(args.key_steps, max_decoder_batch=max_rows)
            ddim, fd = flops_per_image(model, plan, args.steps, args.batch, guided)
            per_call = sorted(decoder_call_steps(plan, args.steps, unet_rows(args.batch, guided)))
            rows.append(["none" if max_rows is None else max_rows, ", ".join(map(str, per_call)),
                         f"{fd / 1e9:,.6g}", f"{ddim / fd:.3f}x"])
    except (OSError, ValueError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    print(f"{args.config}; FasterDiffusion {args.key_steps}, S={args.steps}, batch {args.batch}, guidance "
          f"{args.scale}; DDIM {ddim / 1e9:,.6g} GFLOP/img")
    print_table(["max_decoder_batch", "steps per decoder call", "GFLOP/img", "fewer than DDIM"], rows)
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/latent-diffusion/cin256-v2.yaml")
    parser.add_argument("--key_steps", default="ldm250")
    parser.add_argument("--steps", type=positive, default=250)
    parser.add_argument("--batch", type=positive, default=178)
    parser.add_argument("--scale", type=float, default=1.5, help="guidance scale (1: no guidance, one row an image)")
    parser.add_argument("--caps", type=caps, default="none,512,1024,2048",
                        help="comma list of max_decoder_batch values ('none': whole groups)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
