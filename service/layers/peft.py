"""The PEFT public API: LoRA, rsLoRA, DoRA, LoRA+, BitFit, bottleneck adapters and QLoRA for YOLO detectors.

Example:
    >>> from models import DetectionModel
    >>> from service.layers.peft import apply_lora, apply_bitfit, merge_lora
    >>> model = DetectionModel(nc=80)
    >>> apply_lora(model.backbone, rank=8)
    >>> apply_bitfit(model)
    >>> ...  # train
    >>> merge_lora(model); model.save("merged")

Methods register themselves (``register_peft_method``); see docs/PEFT.md for every
call, the BatchNorm statistics choice, merge semantics and how to add a method.
"""

from service.layers.tuners.adapter import AdapterConfig, AdapterLayer, apply_adapters
from service.layers.tuners.base import (
    BN_STATS_CHOICES,
    BaseTunerLayer,
    PeftState,
    TunerConfig,
    UnknownAdapterError,
    UnknownMethodError,
    canonical_name,
    find_peft_state,
    has_peft_layers,
    is_peft_layer,
)
from service.layers.tuners.bitfit import BitFitConfig, apply_bitfit
from service.layers.tuners.combine import COMBINE_METHODS, combine_adapters, prune_adapter
from service.layers.tuners.dora import DoRAConfig, DoraVariant, apply_dora
from service.layers.tuners.io import load_adapter, read_adapter_config, save_adapter
from service.layers.tuners.lora import LoRAConfig, LoRALayer, LoraVariant, apply_lora, lora_plus_param_groups
from service.layers.tuners.model import (
    active_adapters,
    delete_adapter,
    list_adapters,
    merge_lora,
    merged_copy,
    set_adapter,
    unmerge_lora,
)
from service.layers.tuners.nf4 import NF4Weight, quantize_nf4
from service.layers.tuners.qlora import QLoRAConfig, QLoRALayer, apply_qlora, quantized_bytes
from service.layers.tuners.registry import (
    PeftMethod,
    apply_peft,
    get_peft_method,
    is_mergeable,
    list_peft_methods,
    peft_config_class,
    register_peft_method,
    unregister_peft_method,
)
from service.layers.tuners.report import TrainableReport, trainable_report

__all__ = [
    "AdapterConfig", "AdapterLayer", "BN_STATS_CHOICES", "BaseTunerLayer", "BitFitConfig", "COMBINE_METHODS", "DoRAConfig",
    "DoraVariant", "LoRAConfig", "LoRALayer", "LoraVariant", "NF4Weight", "PeftMethod", "PeftState", "QLoRAConfig",
    "QLoRALayer", "TrainableReport", "TunerConfig", "UnknownAdapterError", "UnknownMethodError",
    "active_adapters", "apply_adapters", "apply_bitfit", "apply_dora", "apply_lora", "apply_peft", "apply_qlora",
    "canonical_name", "combine_adapters", "delete_adapter", "find_peft_state", "get_peft_method", "has_peft_layers",
    "is_mergeable", "is_peft_layer", "list_adapters", "list_peft_methods", "load_adapter", "lora_plus_param_groups",
    "merge_lora", "merged_copy", "peft_config_class", "prune_adapter", "quantize_nf4", "quantized_bytes", "read_adapter_config",
    "register_peft_method", "save_adapter", "set_adapter", "trainable_report", "unmerge_lora", "unregister_peft_method",
]
