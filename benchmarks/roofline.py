"""The fastest one UNet forward could run on a GPU, from its counted work alone, and where that time goes.

Eager PyTorch runs every operation as its own kernel, which reads its inputs from GPU memory and writes its
outputs back. Each operation of one forward pass is counted without computing anything (meta tensors): its FLOPs
(torch.utils.flop_counter's table) and the bytes of its inputs and outputs. Its roofline time is
max(FLOPs / peak, bytes / bandwidth). The sum is a lower bound on the eager forward, and FLOPs / peak over that
sum bounds the MFU that eager execution can reach at this batch. A compiler that fuses the elementwise operations
into their neighbours (torch.compile) is not bound by it. The table groups the operations by kind.

With --measure it also runs the forward on --device under torch.profiler and puts beside each kind the time its
kernels took (their own time, repeated forwards averaged) and the roofline's share of it, and the forward's time
without the profiler: the gap between the two bounds shows which kind of operation is far from the hardware.

    python benchmarks/roofline.py                           # cin256-v2, 178 images with guidance, fp16, H100 SXM
    python benchmarks/roofline.py --precision fp32 --rows 2
    python benchmarks/roofline.py --measure --device cuda   # on an H100: measured time beside the bound
"""
import argparse
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

from common import at_least, build_model, device_name, milliseconds_each, positive, print_table, synchronize
from ldm import cli
from ldm.cli import first_line
from ldm.compile import compile_unet
from ldm.util import check_precision, optimize_for_inference, set_tf32

aten = torch.ops.aten
ATTENTION = aten.scaled_dot_product_attention  # kept whole: on a GPU it runs as one fused kernel
# (part of an ATen operation's name, kind), first match: the counted operations (aten.convolution) and those the
# profiler times (aten::cudnn_convolution, aten::_flash_attention_forward) fall in the same kinds
KINDS = [("conv", "convolution"), ("attention", "attention"), ("mm", "matmul"), ("norm", "normalization"),
         ("copy", "dtype casts")]
OTHER = "elementwise and other"
ALIASES = {"_unsafe_view", "_reshape_alias"}  # views that the schema does not mark as such
# H100 SXM: dense tensor-core peak (TFLOP/s; fp32 runs as TF32) and HBM3 bandwidth (TB/s), NVIDIA's data sheet
H100_PEAK = {"fp16": 989, "bf16": 989, "fp32": 495}
H100_BANDWIDTH = 3.35


def kind_of(name):
    """The kind of an ATen operation, by its name ('aten::' optional)."""
    name = name.removeprefix("aten::")
    return next((kind for part, kind in KINDS if part in name), OTHER)


def _bytes(tensor):
    return tensor.numel() * tensor.element_size()


def _flops(func, args, kwargs, out):
    if func.overloadpacket is ATTENTION:
        return sdpa_flop_count(args[0].shape, args[1].shape, args[2].shape)
    count = flop_registry.get(func.overloadpacket)
    return count(*args, **kwargs, out_val=out) if count else 0


class OperationLog(TorchDispatchMode):
    """Records (operation name, FLOPs, bytes read and written) of every operation that computes something.

    Composite operations (linear, conv2d, group_norm) are broken into the kernels eager PyTorch runs; views and
    operations that return their input (dropout in eval) move no data and are left out."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket is aten.dropout and not args[2]:
            return args[0]  # eager dropout in eval returns its input (its decomposition would clone it)
        if func.overloadpacket not in flop_registry and func.overloadpacket is not ATTENTION:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        inputs = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outputs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
        if func.is_view or func.overloadpacket.__name__ in ALIASES or any(o is i for o in outputs for i in inputs):
            return out
        moved = sum(map(_bytes, inputs)) + sum(map(_bytes, outputs))
        self.ops.append((func.overloadpacket.__name__, _flops(func, args, kwargs, out), moved))
        return out


def unet_forward(config, rows, precision, device, compiled=False, cuda_graphs=None, attention="sdpa"):
    """A model of the config with random weights on the device (weights stored in the precision, the attention
    backend of ldm.modules.attention), compiled if asked (ldm.compile.compile_unet), and a function that runs one
    UNet forward of `rows` rows (twice the images with guidance)."""
    check_precision(precision, device)
    model = optimize_for_inference(build_model(config, device=device), precision=precision, attention=attention)
    if compiled:
        compile_unet(model, cuda_graphs=cuda_graphs)
    size = model.image_size
    x = torch.randn(rows, model.channels, size, size, device=device)
    timesteps = torch.full((rows,), model.num_timesteps - 1, device=device)
    with torch.inference_mode():
        context = model.get_learned_conditioning({model.cond_stage_key: torch.zeros_like(timesteps)})

    @torch.inference_mode()
    def forward():
        return model.unet(x, timesteps, context)

    return forward


def unet_operations(config, rows, precision, attention="sdpa"):
    """The operations of one UNet forward of `rows` rows in a precision, counted on meta tensors."""
    forward = unet_forward(config, rows, precision, "meta", attention=attention)
    log = OperationLog()
    with log:
        forward()
    return log.ops


def measure(forward, device, repeats):
    """(kind -> milliseconds its operations' own kernels took per forward, under torch.profiler; milliseconds per
    forward without the profiler). On a GPU the kernels' device time, on the CPU the operations' CPU time."""
    device = torch.device(device)
    forward()  # warm-up: the allocator's pools, cuDNN's and cuBLAS's set-up
    wall = milliseconds_each(forward, device, repeats)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(repeats):
            forward()
        synchronize(device)
    kinds = defaultdict(float)
    for event in profiler.key_averages():
        own = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if event.key.startswith("aten::"):
            kinds[kind_of(event.key)] += own / repeats / 1e3
    return dict(kinds), wall


def roofline(ops, peak, bandwidth):
    """kind -> [operations, FLOPs, bytes, seconds], each operation at max(FLOPs / peak, bytes / bandwidth)."""
    kinds = defaultdict(lambda: [0, 0, 0, 0.0])
    for name, flops, moved in ops:
        row = kinds[kind_of(name)]
        row[0] += 1
        row[1] += flops
        row[2] += moved
        row[3] += max(flops / peak, moved / bandwidth)
    return dict(kinds)


def check_args(args):
    """Bad flags as a UsageError, before any model work. The device is --measure's: without it only its name."""
    if args.measure:
        cli.check_precision_is_fast(args.precision, cli.resolve_device(args.device), "--precision")
    elif args.device.partition(":")[0] not in cli.DEVICE_TYPES:
        raise cli.UsageError(f"--device {args.device}: only cpu and cuda devices are supported")
    cli.inspect_model(args)


def main(args):
    if args.measure and args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device: measure on the CPU (--device cpu) or leave out --measure", file=sys.stderr)
        return 2
    try:
        check_args(args)
    except cli.UsageError as e:
        return cli.report(e)
    device = torch.device(args.device)
    try:
        ops = unet_operations(args.config, args.rows, args.precision, args.attention)
        if args.measure:
            set_tf32(True)  # fp32 as the roofline's peak assumes it: TF32 convolutions and matmuls
            forward = unet_forward(args.config, args.rows, args.precision, device, attention=args.attention)
            measured, wall = measure(forward, device, args.repeats)
    except (OSError, ValueError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    peak = (args.peak or H100_PEAK[args.precision]) * 1e12
    bandwidth = args.bandwidth * 1e12
    kinds = roofline(ops, peak, bandwidth)
    seconds = sum(row[3] for row in kinds.values())
    flops = sum(row[1] for row in kinds.values())
    print(f"{args.config}; one UNet forward of {args.rows} rows, {args.precision}, {args.attention} attention; "
          f"peak {peak / 1e12:g} TFLOP/s, bandwidth {args.bandwidth:g} TB/s"
          + (f"; measured on {device_name(device)}" if args.measure else ""))
    header = ["kind", "operations", "TFLOP", "GB moved", "roofline ms", "share"]
    rows = [[kind, n, f"{f / 1e12:.2f}", f"{b / 1e9:.1f}", f"{s * 1e3:.2f}", f"{s / seconds:.1%}"]
            for kind, (n, f, b, s) in sorted(kinds.items(), key=lambda item: -item[1][3])]
    rows.append(["total", len(ops), f"{flops / 1e12:.2f}", f"{sum(r[2] for r in kinds.values()) / 1e9:.1f}",
                 f"{seconds * 1e3:.2f}", "100.0%"])
    if args.measure:
        header += ["measured ms", "roofline / measured"]
        for row in rows:
            ms = sum(measured.values()) if row[0] == "total" else measured.get(row[0], 0.0)
            row += [f"{ms:.2f}", f"{float(row[4]) / ms:.0%}" if ms else "n/a"]
    print_table(header, rows)
    print(f"eager MFU bound: {flops / peak / seconds:.1%} (FLOPs at peak: {flops / peak * 1e3:.2f} ms)")
    if args.measure:
        print(f"measured: {wall:.2f} ms a forward without the profiler, MFU {flops / peak / (wall / 1e3):.1%}")
    return 0


def add_forward_arguments(parser, backends=("sdpa", "matmul")):
    """The options of unet_forward: config, rows, precision, attention backend (of `backends`, the first the
    default; "auto" chooses by the device, which the operations counted on meta tensors do not know)."""
    parser.add_argument("--config", default="configs/latent-diffusion/cin256-v2.yaml")
    parser.add_argument("--rows", type=at_least(1), default=356, help="UNet batch: twice the images with guidance")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp16",
                        help="fp16/bf16: weights stored in it (store_weights), normalization in float32")
    parser.add_argument("--attention", choices=backends, default=backends[0],
                        help="sdpa: PyTorch's fused kernel; matmul: scores written out, two batched matmuls; auto: "
                             "matmul on a GPU for heads wider than flash attention takes, else sdpa")


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_forward_arguments(parser)
    parser.add_argument("--peak", type=positive, default=None, help="TFLOP/s (default: H100 SXM dense, TF32 for fp32)")
    parser.add_argument("--bandwidth", type=positive, default=H100_BANDWIDTH, help="memory bandwidth in TB/s")
    parser.add_argument("--measure", action="store_true", help="also time the forward on --device (random weights)")
    parser.add_argument("--device", default="cuda", help="with --measure")
    parser.add_argument("--repeats", type=at_least(1), default=3, help="with --measure: forwards timed and profiled")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
