"""The PEFT public API: LoRA, rsLoRA, DoRA, LoRA+, BitFit, bottleneck adapters and QLoRA for YOLO detectors.

Example:
    >>> from models import DetectionModel
    >>> from service.layers.peft import apply_lora, apply_bitfit, merge_lora
    >>> model = DetectionModel(nc=80)
    >>> apply_lora(model.backbone, rank=8)
    >>> apply_bitfit(model)
    >>> ...  # train
    >>> merge_lora(model); model.save("merged")

See docs/PEFT.md for every call, the BatchNorm statistics choice and merge semantics.
"""

from service.layers.tuners.adapter import AdapterConfig, AdapterLayer, apply_adapters
from service.layers.tuners.base import UnknownAdapterError, UnknownMethodError, canonical_name
from service.layers.tuners.bitfit import BitFitConfig, apply_bitfit
from service.layers.tuners.combine import COMBINE_METHODS, combine_adapters, prune_adapter
from service.layers.tuners.dora import DoRAConfig, apply_dora
from service.layers.tuners.io import load_adapter, read_adapter_config, save_adapter
from service.layers.tuners.lora import LoRAConfig, LoRALayer, apply_lora, lora_plus_param_groups
from service.layers.tuners.model import active_adapters, delete_adapter, list_adapters, merge_lora, set_adapter, unmerge_lora
from service.layers.tuners.nf4 import NF4Weight, quantize_nf4
from service.layers.tuners.qlora import QLoRAConfig, apply_qlora, quantized_bytes
from service.layers.tuners.registry import apply_peft, list_peft_methods, peft_config_class
from service.layers.tuners.report import TrainableReport, trainable_report

__all__ = [
    "AdapterConfig", "AdapterLayer", "BitFitConfig", "COMBINE_METHODS", "DoRAConfig", "LoRAConfig", "LoRALayer",
    "NF4Weight", "QLoRAConfig", "TrainableReport", "UnknownAdapterError", "UnknownMethodError",
    "active_adapters", "apply_adapters", "apply_bitfit", "apply_dora", "apply_lora", "apply_peft", "apply_qlora",
    "canonical_name", "combine_adapters", "delete_adapter", "list_adapters", "list_peft_methods", "load_adapter",
    "lora_plus_param_groups", "merge_lora", "peft_config_class", "prune_adapter", "quantize_nf4", "quantized_bytes",
    "read_adapter_config", "save_adapter", "set_adapter", "trainable_report", "unmerge_lora",
]
