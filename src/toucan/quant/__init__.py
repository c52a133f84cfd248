"""Weight quantization (GPTQ / RTN, 2-8 bits) in the standard GPTQ format (loading it is
toucan.modeling.load_quantized, beside the other loaders).

Importing this package is cheap: GPTQModel (a ~10 s import) loads only inside the functions."""

from .gptq import run_quantize

__all__ = ["run_quantize"]
