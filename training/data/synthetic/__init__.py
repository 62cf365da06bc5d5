"""The synthetic egocentric data generator: procedurally drawn objects, clean source and egocentric target domains."""

from training.data.synthetic.classes import CLASS_NAMES
from training.data.synthetic.generator import DOMAINS, Effects, SyntheticSample, render_frame, render_sample
from training.data.synthetic.writer import generate_dataset

__all__ = ["CLASS_NAMES", "DOMAINS", "Effects", "SyntheticSample", "generate_dataset", "render_frame", "render_sample"]
