"""Where one UNet forward's time goes, eager or compiled: its GPU kernels by device time under torch.profiler
(on the CPU, its ATen operations by CPU time), each put in a family, and the forward's MFU.

roofline.py sets eager operations beside their bound. A compiled forward runs other kernels (generated ones that
fuse the elementwise work, and the library's convolutions and matmuls), so here the kernels themselves are
listed: which of them keep the forward from the peak.

    python benchmarks/profile_forward.py --device cuda --compile                        # cin256-v2, 356 rows, fp16
    python benchmarks/profile_forward.py --device cuda --compile --cudnn_benchmark off  # cuDNN's autotuner off
    python benchmarks/profile_forward.py --device cuda --compile --attention sdpa       # SDPA for every head
    python benchmarks/profile_forward.py --device cuda --compile --inductor coordinate_descent_tuning=True
    python benchmarks/profile_forward.py --device cpu --config tests/fixtures/tiny/config.yaml --rows 2
"""
import argparse
import re
import sys
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from common import (add_cudnn_benchmark_argument, add_inductor_argument, at_least, describe_options, device_name,
                    inductor_options, milliseconds_each, positive, print_table, synchronize, timed)
from ldm import cli
from ldm.cli import first_line
from ldm.modules.attention import ATTENTION_BACKENDS
from ldm.util import set_tf32
from roofline import H100_PEAK, add_forward_arguments, unet_forward, unet_operations

# (family, pattern), first match, on kernel names (cuDNN, cuBLAS, CUTLASS, PyTorch, Triton) and ATen names alike.
# Generated kernels come first: Triton names them after the operations they fuse ("triton_poi_fused_convolution_").
FAMILIES = [
    ("generated (Triton)", r"triton"),
    ("attention", r"fmha|flash|attention"),
    ("convolution", r"conv|fprop|winograd|nchw|nhwc"),
    ("matmul", r"gemm|cublas|cutlass|nvjet|::(add|b|baddb)?mm\b"),
    ("normalization", r"norm|moments"),
]
OTHER = "elementwise and other"


def family_of(name):
    return next((family for family, pattern in FAMILIES if re.search(pattern, name, re.IGNORECASE)), OTHER)


def kernel_times(forward, device, repeats):
    """name -> [calls, milliseconds] per forward: on a GPU its kernels' device time, on the CPU its ATen operations'
    own CPU time."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(repeats):
            forward()
        synchronize(device)
    times = {}
    for event in profiler.key_averages():
        if device.type == "cuda" and event.device_type == DeviceType.CUDA:
            times[event.key] = [event.count / repeats, event.self_device_time_total / repeats / 1e3]
        elif device.type != "cuda" and event.key.startswith("aten::") and event.self_cpu_time_total > 0:
            times[event.key] = [event.count / repeats, event.self_cpu_time_total / repeats / 1e3]
    return times


def main(args):
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device: profile on the CPU (--device cpu)", file=sys.stderr)
        return 2
    try:
        device = cli.resolve_device(args.device)
        cli.inspect_model(args)
    except cli.UsageError as e:
        return cli.report(e)
    if device.type == "cuda":
        set_tf32(True)
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    try:
        with inductor_options(args.inductor):
            flops = sum(f for _, f, _ in unet_operations(args.config, args.rows, args.precision, args.attention))
            forward = unet_forward(args.config, args.rows, args.precision, device, compiled=args.compile,
                                   cuda_graphs=False if args.no_cuda_graphs else None, attention=args.attention)
            # compiling, CUDA graphs' recording, cuDNN's autotuning
            _, warmup = timed(lambda: [forward() for _ in range(args.warmup)], device)
            wall = milliseconds_each(forward, device, args.repeats)
            times = kernel_times(forward, device, args.repeats)
    except (OSError, ValueError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    peak = (args.peak or H100_PEAK[args.precision]) * 1e12
    variant = ("compiled" + (" (no CUDA graphs)" if args.no_cuda_graphs or device.type != "cuda" else "")
               + f" (inductor: {describe_options(args.inductor)})" if args.compile else "eager")
    autotuner = args.cudnn_benchmark if device.type == "cuda" else "n/a"
    print(f"{args.config}; one UNet forward of {args.rows} rows, {args.precision}, {variant}, "
          f"{args.attention} attention, cuDNN benchmark {autotuner}; on {device_name(device)}; "
          f"warm-up {warmup:.1f} s")
    mfu = f", MFU {flops / peak / (wall / 1e3):.1%} of {peak / 1e12:g}" if device.type == "cuda" or args.peak else ""
    print(f"forward: {wall:.2f} ms without the profiler, {flops / 1e9:.5g} GFLOP, "
          f"{flops / (wall / 1e3) / 1e12:.3g} TFLOP/s{mfu}")
    total = sum(ms for _, ms in times.values())
    if not total:
        print("the profiler recorded no kernel time (try --no_cuda_graphs)")
        return 0
    families = defaultdict(lambda: [0, 0.0, 0.0])
    for name, (calls, ms) in times.items():
        row = families[family_of(name)]
        row[0] += 1
        row[1] += calls
        row[2] += ms
    print_table(["family", "kernels", "calls", "ms", "share"],
                [[family, n, f"{calls:g}", f"{ms:.2f}", f"{ms / total:.1%}"]
                 for family, (n, calls, ms) in sorted(families.items(), key=lambda item: -item[1][2])]
                + [["total", len(times), f"{sum(c for c, _ in times.values()):g}", f"{total:.2f}", "100.0%"]])
    top = sorted(times.items(), key=lambda item: -item[1][1])[:args.top]
    print_table(["kernel", "family", "calls", "ms", "share"],
                [[name[:args.name_width], family_of(name), f"{calls:g}", f"{ms:.2f}", f"{ms / total:.1%}"]
                 for name, (calls, ms) in top])
    return 0


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_forward_arguments(parser, ATTENTION_BACKENDS)  # auto by default, as in the scripts
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", action="store_true", help="compile the UNet (CUDA graphs on a GPU)")
    parser.add_argument("--no_cuda_graphs", action="store_true", help="with --compile on a GPU: no CUDA graphs")
    add_inductor_argument(parser)
    add_cudnn_benchmark_argument(parser)
    parser.add_argument("--peak", type=positive, default=None,
                        help="TFLOP/s for the MFU (default on a GPU: H100 SXM dense, TF32 for fp32)")
    parser.add_argument("--warmup", type=at_least(0), default=3, help="untimed forwards first")
    parser.add_argument("--repeats", type=at_least(1), default=3, help="forwards timed, then profiled")
    parser.add_argument("--top", type=at_least(1), default=25, help="kernels listed")
    parser.add_argument("--name_width", type=at_least(1), default=100, help="characters of a kernel's name shown")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
