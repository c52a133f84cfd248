"""One module per command, named after it (`toucan eval generate` -> `commands/eval_generate.py`).

Each has `run(cfg) -> int`: the command's config dataclass (toucan.config) -> library calls ->
what the user sees -> exit code. Nothing below this layer takes a config, prints or exits.
"""
