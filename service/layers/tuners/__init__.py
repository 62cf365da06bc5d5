"""PEFT methods for convolutional detectors, one file per method (Hugging Face PEFT style).

Each method's module registers it (``registry.register_peft_method``) when imported;
a new method is one new file plus one import line here.
"""

from service.layers.tuners import adapter, bitfit, dora, lora, qlora  # noqa: F401  (the built-in methods register)
