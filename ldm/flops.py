"""FLOPs of the operations run under a context, by PyTorch's FLOP formulas (torch.utils.flop_counter), as a total.

`FlopCounter` counts what torch's `FlopCounterMode` counts, with the same formulas and the same rule for an operation
without a formula (its decomposition is run and counted, where it has one), but keeps no table per module: that
bookkeeping and a try at decomposing every operation made counting a small UNet cost about 4 times a plain call
(about 2 times here). Attention is counted on the CPU too, where scaled-dot-product attention runs a fused kernel
that PyTorch's table leaves out.
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count, shape_wrapper

# The fused CPU attention kernel that PyTorch's FLOP table leaves out (absent from older PyTorch).
_CPU_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@shape_wrapper
def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


FORMULAS = {**flop_registry, **({_CPU_ATTENTION: _cpu_attention_flops} if _CPU_ATTENTION else {})}


def _decomposes(op):
    """Whether op has a decomposition (OpOverload.decompose does not return NotImplemented)."""
    key = torch._C.DispatchKey.CompositeImplicitAutograd
    return key in op.py_kernels or torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key)


class FlopCounter(TorchDispatchMode):
    """`with FlopCounter() as counter: ...`, then counter.flops: the FLOPs of the aten operations run inside."""

    def __init__(self):
        super().__init__()
        self.flops = 0
        self._decomposable = {}  # op -> whether it has a decomposition, looked up once per op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        decomposes = self._decomposable.get(func)
        if decomposes is None:
            decomposes = self._decomposable[func] = func is not torch.ops.prim.device.default and _decomposes(func)
        if decomposes:  # counted in its parts, as FlopCounterMode does
            with self:
                return func.decompose(*args, **kwargs)
        out = func(*args, **kwargs)
        formula = FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out
