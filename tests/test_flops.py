"""ldm.flops.FlopCounter: the totals of torch's FlopCounterMode, attention on the CPU included."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from conftest import TINY_CONFIG
from ldm.compile import placeholder_inputs
from ldm.flops import FlopCounter
from ldm.util import build_model

CPU_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def torch_count(call):
    """FlopCounterMode's total for call(), with PyTorch's own attention formula for the fused CPU kernel."""
    mapping = {CPU_ATTENTION: lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)} if CPU_ATTENTION else {}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        call()
    return counter.get_total_flops()


def count(call):
    with FlopCounter() as counter:
        call()
    return counter.flops


@pytest.mark.parametrize("device, grad_mode", [("cpu", torch.inference_mode), ("cpu", torch.no_grad),
                                               ("meta", torch.inference_mode)])
def test_unet_calls_count_as_flop_counter_mode_counts_them(tiny_model, device, grad_mode):
    model = tiny_model if device == "cpu" else build_model(str(TINY_CONFIG))
    unet = model.unet
    x, t, context = placeholder_inputs(model, 4)
    with grad_mode():
        skips, mid = unet.encode(x, t, context)
        deep = unet.forward_deep(x, t, context, branch=1)[1]
        calls = [lambda: unet(x, t, context), lambda: unet.encode(x, t, context),
                 lambda: unet.decode(skips, mid, t, context), lambda: unet.forward_shallow(x, deep, t, context, 1)]
        for call in calls:
            flops = count(call)
            assert flops == torch_count(call) > 0
    assert count(lambda: unet(x, t, context)) > count(lambda: unet.forward_shallow(x, deep, t, context, 1))


def test_composite_operations_are_counted_in_their_parts():
    a, b, bias = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
    with torch.inference_mode():  # linear reaches the counter whole here, and is counted as its addmm
        assert count(lambda: torch.nn.functional.linear(a, b, bias)) == 2 * 3 * 4 * 5
        attention = lambda: torch.nn.functional.scaled_dot_product_attention(*torch.randn(3, 2, 7, 8))
        assert count(attention) == torch_count(attention) == 2 * 2 * 2 * 7 * 7 * 8
    assert count(lambda: a + 1) == 0
