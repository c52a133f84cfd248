"""The defaults that both the library and the commands' options use, defined once.

The library never imports `toucan.config` (the commands' options), so a default that a library
function and a command flag share lives here and both refer to it. Command-only defaults stay in
`toucan.config` next to their help text.
"""

MAX_LEN = 512          # tokens per training example / calibration sequence / ppl window (and stride)
SEED = 42              # data sampling, shuffling, init
GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_k_m")  # what `export gguf` writes (gguf_export.TYPES)
