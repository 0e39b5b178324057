"""torch.compile of the UNet and its halves for sampling: a few shapes, compiled once before sampling, cached on disk.

Sampling meets few shapes (`Mode.unet_calls` says which): the whole UNet (one graph) and its parts at the batch's
rows (twice the batch with guidance), and the decoder at n steps of those rows for every size n of a cache's
decoder calls. `compile_unet` pads n > 1 up to the nearest of a few bucket sizes
(`choose_buckets`): the padding repeats the last step and its rows are dropped. Every UNet row is computed on its
own (no operation mixes rows), so the other rows do not change. `warm_up` then compiles every shape of a mode
before sampling.

The compiled code is cached on disk (`use_compile_cache`): later runs and the other MPI ranks load it instead of
compiling again.
"""
import os
import time
from collections import Counter

import torch

from ldm.models.diffusion.cache import SamplerStats, UNetCalls
from ldm.models.diffusion.guidance import unet_rows
from ldm.sampling import unconditional_class

COMPILE_CACHE = "outputs/cache/torch_compile"
MAX_DECODER_SHAPES = 4  # bucket sizes for decoder calls of more than one step
RECOMPILE_LIMIT = 64  # compiled shapes kept per UNet method (torch's default, 8, is too few for several batch sizes)


def use_compile_cache(folder=COMPILE_CACHE):
    """Keep inductor's caches (compiled graphs and kernels) in folder, unless TORCHINDUCTOR_CACHE_DIR names one;
    returns the folder in use."""
    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.abspath(folder))


def decoder_call_steps(plan, num_steps, rows):
    """How many decoder calls of each step count (Counter) a cache plan or a mode makes over num_steps steps."""
    return Counter({call.steps: count for call, count in plan.unet_calls(num_steps, rows).items()
                    if call.method == "decode" and call.shared})


def choose_buckets(counts, max_shapes=MAX_DECODER_SHAPES):
    """At most max_shapes step counts covering the calls of `counts` (steps -> calls) with the fewest padded
    steps, each call padded to the smallest bucket that holds it. One-step calls (the plain decoder, another code
    path) are never padded and need no bucket."""
    sizes = sorted(n for n in counts if n > 1)
    if not sizes:
        return ()

    def waste(lo, hi):  # padding of sizes[lo..hi] up to sizes[hi]
        return sum(counts[n] * (sizes[hi] - n) for n in sizes[lo:hi + 1])

    # best[k][i]: (padding, buckets) covering sizes[0..i] with k buckets, the last one sizes[i]
    best = [{i: (waste(0, i), (sizes[i],)) for i in range(len(sizes))}]
    for _ in range(1, max_shapes):
        layer = {}
        for i in range(len(sizes)):
            options = [best[-1][i]] + [(best[-1][j][0] + waste(j + 1, i), best[-1][j][1] + (sizes[i],))
                                       for j in range(i)]
            layer[i] = min(options)
        best.append(layer)
    return best[-1][len(sizes) - 1][1]


def bucket_for(steps, buckets):
    """The step count a decoder call of `steps` steps runs at: the smallest bucket that holds it, else itself."""
    if steps == 1:
        return 1
    return min((b for b in buckets if b >= steps), default=steps)


def _repeat_last(rows, steps, padded):
    """rows of `steps` equal-sized blocks, with the last block repeated up to `padded` blocks."""
    if rows is None or padded == steps:
        return rows
    block = len(rows) // steps
    return torch.cat([rows, rows[-block:].repeat(padded - steps, *[1] * (rows.dim() - 1))])


def padded_decode(decode, buckets):
    """decode(skips, mid, timesteps, context, y, out_dtype) with the steps padded to a bucket (see bucket_for)."""

    def call(skips, mid, timesteps, context=None, y=None, out_dtype=None):
        steps = len(timesteps) // len(mid)
        padded = bucket_for(steps, buckets)
        timesteps, context, y = (_repeat_last(v, steps, padded) for v in (timesteps, context, y))
        return decode(skips, mid, timesteps, context, y, out_dtype)[:steps * len(mid)]

    return call


def _graph_call(fn, cuda_graphs, timesteps_at, backend):
    """fn compiled, its positional argument timesteps_at (the timesteps) made float32 as the UNet's first use of
    them does, so that integer and float timesteps share one graph. With CUDA graphs the outputs are cloned: the
    graph's next replay overwrites its own."""
    compiled = torch.compile(fn, dynamic=False, backend=backend, mode="reduce-overhead" if cuda_graphs else None)

    def call(*args, **kwargs):
        args = list(args)
        args[timesteps_at] = args[timesteps_at].float()
        if not cuda_graphs:
            return compiled(*args, **kwargs)
        torch.compiler.cudagraph_mark_step_begin()
        return _clone(compiled(*args, **kwargs))

    return call


def _clone(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    return type(out)(_clone(o) for o in out)


def _whole(encode, decode):
    """The UNet's forward over its eager halves: compiled, one graph for whole passes, so that the encoder's
    features stay inside it (between two graphs, CUDA graphs clone them and copy them in again: about 3 GB at
    cin256-v2's 356 rows)."""

    def forward(x, timesteps, context=None, y=None):
        skips, mid = encode(x, timesteps, context, y)
        return decode(skips, mid, timesteps, context, y, out_dtype=x.dtype)

    return forward


def compile_unet(model, buckets=(), cuda_graphs=None, backend="inductor"):
    """Compile the UNet's whole forward (one graph), its encoder, decoder and DeepCache halves (decode_deep,
    forward_shallow) in place with torch.compile's `backend`, with CUDA graphs on a GPU unless cuda_graphs=False;
    decoder calls of several steps are padded to `buckets` (see choose_buckets). Raises torch's limit of compiled
    shapes per method to RECOMPILE_LIMIT, so that no shape falls back to eager."""
    unet = model.unet
    if cuda_graphs is None:
        cuda_graphs = model.device.type == "cuda"
    elif cuda_graphs and model.device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, not {model.device.type}")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    unet.forward = _graph_call(_whole(unet.encode, unet.decode), cuda_graphs, 1, backend)  # (x, timesteps, ...)
    unet.encode = _graph_call(unet.encode, cuda_graphs, 1, backend)  # (x, timesteps, ...)
    unet.decode = padded_decode(_graph_call(unet.decode, cuda_graphs, 2, backend), buckets)  # (skips, mid, timesteps, ...)
    unet.decode_deep = _graph_call(unet.decode_deep, cuda_graphs, 2, backend)  # (skips, mid, timesteps, ...)
    unet.forward_shallow = _graph_call(unet.forward_shallow, cuda_graphs, 2, backend)  # (x, deep, timesteps, ...)
    return model


def mode_buckets(modes, num_steps, rows, max_shapes=MAX_DECODER_SHAPES):
    """Bucket sizes for the decoder calls of the modes (see choose_buckets)."""
    counts = Counter()
    for mode in modes:
        counts += decoder_call_steps(mode, num_steps, rows)
    return choose_buckets(counts, max_shapes)


def decoder_steps(modes, num_steps, rows, buckets=()):
    """The step counts of the modes' decoder calls, padded to buckets."""
    return {bucket_for(n, buckets) for mode in modes for n in decoder_call_steps(mode, num_steps, rows)}


def placeholder_inputs(model, rows):
    """(x, timesteps, context) of `rows` rows for calls whose values do not matter (compiling, counting FLOPs): zero
    latents at the last timestep with the unconditional class's context, on the model's device."""
    x = torch.zeros(rows, model.channels, model.image_size, model.image_size, device=model.device)
    t = torch.full((rows,), model.num_timesteps - 1, device=model.device)
    labels = torch.full((rows,), unconditional_class(model), device=model.device)
    return x, t, model.get_learned_conditioning({model.cond_stage_key: labels})


def call_arguments(unet, call, x, t, context, features=None):
    """The arguments of a UNetCalls method for one kind of call on placeholder inputs; the features it takes
    (the encoder's, or the deep ones of DeepCache's whole pass) are computed here, once per `features` dict that
    the caller passes for its calls, so that the call alone can be run, timed or counted."""
    features = {} if features is None else features
    if call.method == "decode":
        if "encoder" not in features:
            features["encoder"] = unet.encode(x, t, context)
        skips, mid = features["encoder"]
        if not call.shared:  # each step's own features: as many rows as the timesteps
            skips, mid = [s.repeat(call.steps, 1, 1, 1) for s in skips], mid.repeat(call.steps, 1, 1, 1)
        return skips, mid, t.repeat(call.steps), context.repeat(call.steps, 1, 1)
    if call.method == "forward_deep":
        return x, t, context, call.branch
    if call.method == "forward_shallow":
        if ("deep", call.branch) not in features:
            features["deep", call.branch] = unet.forward_deep(x, t, context, branch=call.branch)[1]
        return x, features["deep", call.branch], t, context, call.branch
    return x, t, context


COMPILED_METHODS = {"full": "forward", "encode": "encode", "decode": "decode", "forward_deep": "decode_deep",
                    "forward_shallow": "forward_shallow"}  # the UNet method each kind of call runs compiled


@torch.inference_mode()
def run_each_call(model, modes, num_steps, rows, precision, decoder_steps=()):
    """Run once, on `rows` rows, each kind of UNet call that sampling num_steps steps with the modes makes
    (Mode.unet_calls), in the precision; decoder calls at each of decoder_steps steps. Returns the set of (UNet
    method, rows) that ran."""
    x, t, context = placeholder_inputs(model, rows)
    calls = UNetCalls(model, precision, SamplerStats())
    calls_made = [call for mode in modes for call in mode.unet_calls(num_steps, rows)]
    kinds = dict.fromkeys(call._replace(steps=1) for call in calls_made)
    shapes, features = set(), {}
    for kind in kinds:
        if kind.method == "decode" and kind.shared:
            step_counts = sorted(decoder_steps)
        else:  # calls whose steps have features of their own are never padded: as many shapes as step counts
            step_counts = sorted({call.steps for call in calls_made if call._replace(steps=1) == kind})
        for steps in step_counts:
            call = kind._replace(steps=steps)
            getattr(calls, call.method)(*call_arguments(model.unet, call, x, t, context, features))
            shapes.add((COMPILED_METHODS[call.method], steps * rows))
    return shapes


def run_mode_calls(model, modes, num_steps, batch_size, guided, precision, buckets=()):
    """Run once each kind of UNet call, at each shape, that sampling with the modes meets at this batch size
    (run_each_call); returns the set of (UNet method, rows) that ran."""
    rows = unet_rows(batch_size, guided)
    return run_each_call(model, modes, num_steps, rows, precision, decoder_steps(modes, num_steps, rows, buckets))


def warm_up(model, modes, num_steps, batch_size, guided, precision, buckets=()):
    """Compile every shape that sampling with the modes meets (on a GPU three calls each: CUDA graphs record on
    the second); returns (number of compiled shapes, seconds)."""
    start = time.perf_counter()
    for _ in range(3 if model.device.type == "cuda" else 1):
        shapes = run_mode_calls(model, modes, num_steps, batch_size, guided, precision, buckets)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return len(shapes), time.perf_counter() - start
