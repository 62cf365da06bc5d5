"""PEFT methods for convolutional detectors, one file per method (Hugging Face PEFT style).

Each method's module registers it (``registry.register_peft_method``) when imported;
a new method is one new file plus one import line here.
"""

from service.layers.tuners import lora  # noqa: F401  (each import registers its methods)
from service.layers.tuners import dora  # noqa: F401
from service.layers.tuners import qlora  # noqa: F401
from service.layers.tuners import bitfit  # noqa: F401
from service.layers.tuners import adapter  # noqa: F401
