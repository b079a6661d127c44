r"""LoTR — low tensor rank adaptation (Bershatsky, Cherniuk, Daulbaev, Mikhalev, Oseledets, arXiv 2402.01376;
reference code github.com/daskol/lotr) as a peft tuner.

The updates of all same-shaped target weights form a Tucker-2 tensor: per layer ``k``

    ΔW_k = s · L · G_k · Rᵀ,    L ∈ R^{out×r}, R ∈ R^{in×r} shared by every layer of that shape, G_k ∈ R^{r×r}

computed as ``s · ((x R) G_kᵀ) Lᵀ``. Parameters ``r (out + in)`` per shape group plus ``r²`` per layer, against
LoRA's ``r (out + in)`` per layer. Defaults as the reference: ``L, R ~ N(0, 1)``, ``G_k = 0`` (no change at
step 0), everything trainable, ``s = alpha / r`` with ``alpha = 1``; one ``(L, R)`` pair per weight shape.
Each ``ΔW_k`` is exactly a rank-``r`` LoRA (``B = s L G_k``, ``A = Rᵀ``): :func:`lotr_to_lora_state_dict`
exports the adapter as a plain peft LoRA (``lora_alpha = r``, scaling 1) with identical outputs.

peft has no LoTR and its ``register_peft_method`` only accepts names already in its ``PeftType`` enum, so
:func:`register` inserts the string key ``"LOTR"`` into peft's mapping dictionaries (at import of this module).
That touches peft internals: the package pins ``peft`` to its minor version and a test round-trips
``save_pretrained`` / ``PeftModel.from_pretrained``. The shared factors live on the tuner (``lotr_L`` / ``lotr_R``,
``ModuleDict[adapter] -> ParameterDict[shape]``), so peft's structural key discovery saves and trains them once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

__all__ = ["LOTR", "LotrConfig", "LotrLayer", "LotrModel", "lotr_to_lora_state_dict", "register"]

LOTR = "LOTR"


@dataclass
class LotrConfig(PeftConfig):
    """peft config of a LoTR adapter (``peft_type = "LOTR"``)."""

    r: int = field(default=16, metadata={"help": "Tucker rank (size of the shared factors and of each core)"})
    alpha: float = field(default=1.0, metadata={"help": "scale s = alpha / r"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "peft patterns"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)
    init_std: float = field(default=1.0, metadata={"help": "std of the normal init of L and R"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LOTR
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not self.alpha > 0 or not self.init_std > 0:
            raise ValueError(f"alpha and init_std must be > 0, got {self.alpha}, {self.init_std}")
        if self.target_modules is None:
            raise ValueError("LotrConfig needs target_modules")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)


def shape_key(out_features: int, in_features: int) -> str:
    return f"{out_features}x{in_features}"


def _adapter_kwargs(weight: torch.Tensor) -> dict[str, Any]:
    """dtype/device for adapter parameters: the base weight's, or float32 over a quantized (integer) base."""
    return {"dtype": weight.dtype if weight.is_floating_point() else torch.float32, "device": weight.device}


class LotrLayer(BaseTunerLayer):
    adapter_layer_names = ("lotr_core",)
    other_param_names = ("r", "scaling", "group")


class LotrLinear(nn.Module, LotrLayer):
    """An ``nn.Linear`` plus ``s · L G Rᵀ`` (``L``, ``R`` held by the tuner; ``G`` — ``lotr_core`` — per layer)."""

    def __init__(self, base_layer: nn.Linear, adapter_name: str, factors: tuple[nn.ModuleDict, nn.ModuleDict],
                 r: int, scaling: float) -> None:
        nn.Module.__init__(self)
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoTR supports nn.Linear targets only, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.lotr_core = nn.ParameterDict({})
        self.r, self.scaling, self.group = {}, {}, {}
        self._factors = factors  # a tuple: not registered here (the tuner owns the shared parameters)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.update_layer(adapter_name, r, scaling)

    def update_layer(self, adapter_name: str, r: int, scaling: float) -> None:
        self.lotr_core[adapter_name] = nn.Parameter(torch.zeros(r, r, **_adapter_kwargs(self.base_layer.weight)))
        self.r[adapter_name], self.scaling[adapter_name] = r, scaling
        self.group[adapter_name] = shape_key(self.out_features, self.in_features)
        self.set_adapter(self.active_adapters)

    def _lr(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        left, right = self._factors
        key = self.group[adapter]
        return left[adapter][key], right[adapter][key]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        left, right = self._lr(adapter)
        return self.scaling[adapter] * (left @ self.lotr_core[adapter] @ right.t())

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        if not self.base_layer.weight.is_floating_point():
            raise ValueError("LoTR cannot merge into a quantized base layer; export_lora and merge in full precision")
        for adapter in adapter_names or self.active_adapters:
            if adapter in self.lotr_core and adapter not in self.merged_adapters:
                merged = self.base_layer.weight.data + self.get_delta_weight(adapter).to(self.base_layer.weight.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs while merging LoTR adapter {adapter!r}")
                self.base_layer.weight.data = merged
                self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            self.base_layer.weight.data -= self.get_delta_weight(adapter).to(self.base_layer.weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.lotr_core:
                continue
            left, right = self._lr(adapter)
            core = self.lotr_core[adapter]
            h = x.to(core.dtype) @ right
            result = result + (self.scaling[adapter] * ((h @ core.t()) @ left.t())).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lotr." + super().__repr__()


class LotrModel(BaseTuner):
    """peft tuner for :class:`LotrConfig` (see module docstring)."""

    prefix: str = "lotr_"
    tuner_layer_cls = LotrLayer
    uses_shared_state: bool = True
    target_module_mapping: dict = {}

    def _pre_injection_hook(self, model: nn.Module, config: LotrConfig, adapter_name: str) -> None:
        if not hasattr(self, "lotr_L"):
            self.lotr_L, self.lotr_R = nn.ModuleDict({}), nn.ModuleDict({})
        self.lotr_L[adapter_name] = nn.ParameterDict({})
        self.lotr_R[adapter_name] = nn.ParameterDict({})

    def _factors_for(self, config: LotrConfig, adapter_name: str, base: nn.Linear) -> None:
        key = shape_key(base.out_features, base.in_features)
        if key in self.lotr_L[adapter_name]:
            return
        kw = _adapter_kwargs(base.weight)
        self.lotr_L[adapter_name][key] = nn.Parameter(torch.randn(base.out_features, config.r, **kw) * config.init_std)
        self.lotr_R[adapter_name][key] = nn.Parameter(torch.randn(base.in_features, config.r, **kw) * config.init_std)

    def _create_and_replace(self, config: LotrConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str) -> None:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoTR supports nn.Linear targets only; {current_key} is {type(base).__name__}")
        self._factors_for(config, adapter_name, base)
        scaling = config.alpha / config.r
        if isinstance(target, LotrLinear):
            target.update_layer(adapter_name, config.r, scaling)
            return
        new = LotrLinear(target, adapter_name, (self.lotr_L, self.lotr_R), config.r, scaling)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)


def register() -> None:
    """Make peft know ``peft_type = "LOTR"`` (config, tuner, prefix); idempotent."""
    from peft import mapping

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[LOTR] = LotrConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[LOTR] = LotrModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[LOTR] = LotrModel.prefix


@torch.no_grad()
def lotr_to_lora_state_dict(peft_model: nn.Module, adapter: str = "default") -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter as a plain peft LoRA: ``(state_dict, LoraConfig kwargs)`` with ``B = s L G_k``, ``A = Rᵀ``,
    ``lora_alpha = r`` (scaling 1). Load with ``peft.set_peft_model_state_dict`` into a LoRA model built
    from those kwargs (or write both with ``save_pretrained``)."""
    from peft import get_peft_model_state_dict

    state, targets, rank = {}, [], None
    for name, module in peft_model.named_modules():
        if isinstance(module, LotrLinear) and adapter in module.lotr_core:
            left, right = module._lr(adapter)
            rank = module.r[adapter]
            prefix = name
            state[f"{prefix}.lora_A.weight"] = right.t().detach().clone()
            state[f"{prefix}.lora_B.weight"] = (module.scaling[adapter] * left @ module.lotr_core[adapter]).detach()
            targets.append(name.split(".")[-1])
    if rank is None:
        raise ValueError(f"no LoTR layer with adapter {adapter!r}")
    # modules_to_save (e.g. a classification head) come along unchanged
    state.update({k: v for k, v in get_peft_model_state_dict(peft_model, adapter_name=adapter).items()
                  if "lotr_" not in k})
    config = peft_model.peft_config[adapter]
    return state, {"r": rank, "lora_alpha": rank, "target_modules": sorted(set(targets)),
                   "modules_to_save": config.modules_to_save}


register()
