"""Weight quantization (GPTQ / RTN, 2-8 bits) in the standard GPTQ format: `gptq.quantize_model`
(the `toucan quantize` command is toucan/commands/quantize.py; loading the result is
toucan.modeling.load_quantized, beside the other loaders).

Importing this package is cheap: it imports none of its modules, and GPTQModel (a ~10 s import)
loads only inside the quantizing functions."""
