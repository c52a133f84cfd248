"""`toucan ppl --model M --data D [--reference R]`: perplexity, KL to a reference, and sparsity."""

from __future__ import annotations

from ..config import PplConfig
from ..errors import ConfigError
from ..fsutil import atomic_write_json, check_output
from ..modeling import adapter_base, check_model_dir, is_adapter, load_model, load_tokenizer
from ..ppl import evaluate, load_sequences
from ..prune import measure_sparsity
from ..quant.calib import is_text_file


def run(cfg: PplConfig) -> int:
    if cfg.max_len < 2 or not 1 <= cfg.stride <= cfg.max_len:
        raise ConfigError(f"need --max-len >= 2 and 1 <= --stride <= --max-len (got {cfg.max_len} and {cfg.stride})")
    inputs = [cfg.model, cfg.data, cfg.reference]
    if cfg.output:
        check_output(cfg.output, overwrite=cfg.overwrite, inputs=inputs, is_dir=False)
    # The model directory first: an empty or wrong folder is named as such, not as a tokenizer problem.
    # A LoRA adapter (--model; --reference uses its recorded base) loads on its base model.
    for d, base in ((cfg.model, cfg.base), (cfg.reference, None)):
        if d:
            adapter_base(d, base) if is_adapter(d) else check_model_dir(d)
    trust = cfg.trust_remote_code
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=trust, base=cfg.base)
    seqs = load_sequences(tokenizer, cfg.data, cfg.max_len, cfg.stride, cfg.template, cfg.max_samples)
    model = load_model(cfg.model, device=cfg.device, trust_remote_code=trust, base=cfg.base)
    reference = None
    if cfg.reference:
        if len(load_tokenizer(cfg.reference, trust_remote_code=trust)) != len(tokenizer):
            raise ConfigError(f"{cfg.reference}: its tokenizer differs from {cfg.model}'s; KL needs the same one")
        reference = load_model(cfg.reference, device=cfg.device, trust_remote_code=trust)
    result = evaluate(model, seqs, reference)
    result.update(model=str(cfg.model), reference=cfg.reference, data=str(cfg.data), ctx=cfg.max_len,
                  stride=cfg.stride, kind="text" if is_text_file(cfg.data) else "instruction responses")
    line = f"ppl {result['ppl']:.4f} over {result['tokens']} tokens ({result['kind']}, ctx {cfg.max_len}"
    line += f", stride {cfg.stride})" if is_text_file(cfg.data) else ")"
    if reference is not None:
        line += f"  KL(reference || model) {result['kl']:.4g} nats/token"
    # Sparsity beside quality: a pruned model's zeros are only worth its ppl/KL (toucan.prune).
    result["sparsity"] = None if is_adapter(cfg.model) else measure_sparsity(cfg.model)
    if result["sparsity"] and result["sparsity"]["sparsity"] > 0:
        sp = result["sparsity"]
        line += f"  sparsity {sp['sparsity']:.2%} of decoder weights"
        line += f" ({sp['pattern']} in {sp['pattern_kept']:.2%} of groups)" if sp.get("pattern") else ""
    print(line)
    if cfg.output:
        check_output(cfg.output, overwrite=cfg.overwrite, inputs=inputs, is_dir=False)  # again, after the work
        atomic_write_json(cfg.output, result)
    return 0
