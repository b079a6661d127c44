"""Keep bitsandbytes 4-bit base layers in their training layout for a whole fit.

bitsandbytes 0.50 added a CPU inference fast path: on a CPU with AVX512-BF16, the first forward of a
``Linear4bit`` that runs in eval mode on an input without gradient re-packs the layer's weight *in place* into
a GEMV layout (``_convert_weight_packed_for_cpu``) and keeps it so. That conversion is lossy (the per-block
``absmax`` scales are cast to bfloat16: the dequantized weight changes by up to ~1e-4 on a small layer, and
bitsandbytes' own inverse does not bring it back), and the packed path's ``gemv_4bit`` has no autograd
kernel: a later training forward through the layer drops the gradient to its input (silently) or, with a
bias, fails with "a view of a leaf Variable that requires grad is being used in an in-place operation".
A fit reaches that path through EVA's calibration (eval mode, no grad), through every validation loop,
and through a base model left in eval mode by ``from_pretrained``.

:func:`keep_training_layout` switches the fast path off on every ``Linear4bit`` of a model (the module
attribute ``support_avx512bf16_for_cpu`` that gates it — a bitsandbytes internal, hence the upper bound on
bitsandbytes in ``pyproject.toml``) and returns layers already re-packed before the fit to the standard
layout. The adapters call it in ``setup``; inference after training then runs through the standard
(dequantize + matmul) path, which is what training computed. Written here because bitsandbytes offers no
switch for it.
"""

from __future__ import annotations

import sys

from torch import nn


def keep_training_layout(model: nn.Module) -> list[str]:
    """Disable the CPU inference re-pack on every bitsandbytes ``Linear4bit`` in ``model``.

    Returns the names of the layers that were already re-packed (converted back to the standard layout; their
    scales stay as bitsandbytes' lossy conversion left them). A no-op when bitsandbytes is not imported.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # nothing can be quantized by it; do not import it (slow, and logs on import)
        return []
    repacked = []
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)
            if getattr(module, "quant_state", None) is not None:
                module.quant_state = module.weight.quant_state
            repacked.append(name)
    return repacked
