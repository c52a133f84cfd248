"""Weight quantization (GPTQ / RTN, 2-8 bits) in the standard GPTQ format, and loading it.

Importing this package is cheap: GPTQModel (a ~10 s import) loads only inside the functions."""

from .gptq import load_quantized, run_quantize

__all__ = ["load_quantized", "run_quantize"]
