"""UNet FLOPs per image of a sampling mode (any solver and cache), counted without sampling.

Each kind of UNet call a run makes (`Mode.unet_calls`) is counted once on meta tensors (ldm.flops, PyTorch's formulas:
no weights, no arithmetic, a fraction of a second), then multiplied by how often the run makes it: the whole UNet
every step; with FasterDiffusion the encoder once a group and the decoder once a call of each step count; with
DeepCache the deep pass at its full steps and the shallow branch at the others. `gpu_table.py` counts its rows so, instead of running
each mode eagerly under the FLOP counter on the GPU; `tests/test_count_flops.py` checks the counts against sampling
runs'.

The table is FasterDiffusion's by decoder cap. The steps of one decoder call share the encoder's features, so the
convolutions over the skip features run once a call (`UNetModel.decode`): a cap (`--max_decoder_batch`) that splits
a group into calls of fewer steps makes more work per image, and how many steps a call holds depends on the batch.

    python benchmarks/count_flops.py                                # cin256-v2, ldm250, S=250, batch 178
    python benchmarks/count_flops.py --batch 64 --caps none,256,512,1024
"""
import argparse
import sys

import torch

from common import at_least, check_steps, print_table, script_args
from ldm import cli
from ldm.compile import call_arguments, decoder_call_steps, placeholder_inputs
from ldm.flops import FlopCounter
from ldm.models.diffusion.cache import SamplerStats, UNetCalls
from ldm.models.diffusion.guidance import unet_rows
from ldm.models.diffusion.modes import make_mode


def counted(call):
    """FLOPs of call()."""
    with FlopCounter() as counter:
        call()
    return counter.flops


@torch.inference_mode()
def flops_per_image(model, mode, num_steps, batch_size, guided):
    """UNet FLOPs per image of sampling num_steps steps with the mode at this batch size; `model` may be on the
    meta device (a build_model(config, device="meta")), where nothing is computed."""
    rows = unet_rows(batch_size, guided)
    calls = UNetCalls(model, "fp32", SamplerStats())
    x, t, context = placeholder_inputs(model, rows)
    total, features = 0, {}
    for call, count in mode.unet_calls(num_steps, rows).items():
        arguments = call_arguments(model.unet, call, x, t, context, features)
        total += count * counted(lambda: getattr(calls, call.method)(*arguments))
    return total / batch_size


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
        cli.check_sampling(script_args(args))  # --steps, --scale
        check_steps(args.steps, key_steps=args.key_steps, script="count_flops.py")
        model = cli.inspect_model(args).eval()  # the architecture on the meta device
        ddim = flops_per_image(model, make_mode(), args.steps, args.batch, guided)
        for max_rows in args.caps:
            mode = make_mode("ddim", "fd", key_steps=args.key_steps, max_decoder_batch=max_rows)
            fd = flops_per_image(model, mode, args.steps, args.batch, guided)
            per_call = sorted(decoder_call_steps(mode.cache, args.steps, unet_rows(args.batch, guided)))
            rows.append(["none" if max_rows is None else max_rows, ", ".join(map(str, per_call)),
                         f"{fd / 1e9:,.6g}", f"{ddim / fd:.3f}x"])
    except (OSError, ValueError) as e:
        return cli.report(cli.first_line(e))
    except cli.UsageError as e:
        return cli.report(e)
    print(f"{args.config}; FasterDiffusion {args.key_steps}, S={args.steps}, batch {args.batch}, guidance "
          f"{args.scale}; DDIM {ddim / 1e9:,.6g} GFLOP/img")
    print_table(["max_decoder_batch", "steps per decoder call", "GFLOP/img", "fewer than DDIM"], rows)
    return 0


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/latent-diffusion/cin256-v2.yaml")
    parser.add_argument("--key_steps", default="ldm250")
    parser.add_argument("--steps", type=at_least(1), default=250)
    parser.add_argument("--batch", type=at_least(1), default=178)
    parser.add_argument("--scale", type=float, default=1.5, help="guidance scale (1: no guidance, one row an image)")
    parser.add_argument("--caps", type=caps, default="none,512,1024,2048",
                        help="comma list of max_decoder_batch values ('none': whole groups)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
