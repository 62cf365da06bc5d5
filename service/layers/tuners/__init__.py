"""PEFT methods for convolutional detectors, one file per method (Hugging Face PEFT style)."""
