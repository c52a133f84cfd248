"""`toucan ppl`: perplexity, and with a reference model the mean per-token KL(reference || model).

Convention (perplexities are comparable only under the same one):
- Plain text (.txt): the whole file is one stream, [BOS] + tokens(text). Windows of `ctx` tokens
  start every `stride` tokens (Hugging Face's "perplexity of fixed-length models" scheme): each
  token is scored once, by the first window that reaches it, with the context that window gives.
  With stride == ctx the windows are disjoint and the first token of each is context only; with
  stride < ctx every scored token sees at least ctx - stride tokens before it. BOS is never scored.
- Instruction data (JSON / JSON Lines): each record is encoded by toucan.data's rule
  ([BOS] + prompt + response + [EOS], truncated to `ctx`), and only the response tokens and EOS
  are scored, given the whole prompt: the loss the model was fine-tuned on.
- ppl = exp(total NLL / scored tokens); KL is summed over the vocabulary at each scored position
  and averaged over the same positions, in nats. Computed in fp32, batch 1: deterministic.
KL separates quantizers far better than perplexity on small models, whose perplexity moves only
in the 4th digit.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable, Iterator

from .data import encode_record, encode_text, iter_records, IGNORE_INDEX, with_bos
from .errors import ConfigError
from .quant.calib import is_text_file, read_text

log = logging.getLogger(__name__)

Seq = tuple[list[int], list[bool]]  # token ids, which positions are scored


def text_windows(ids: list[int], ctx: int, stride: int) -> Iterator[Seq]:
    prev_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + ctx, len(ids))
        window = ids[begin:end]
        first = max(1, len(window) - (end - prev_end))  # positions before `first` were scored already
        yield window, [False] * first + [True] * (len(window) - first)
        prev_end = end
        if end == len(ids):
            break


def load_sequences(tokenizer, path: str | Path, ctx: int, stride: int, template: str,
                   max_samples: int = 0) -> list[Seq]:
    if is_text_file(path):
        ids = with_bos(tokenizer.bos_token_id, encode_text(tokenizer, read_text(path)))
        seqs = list(text_windows(ids, ctx, stride))
    else:
        seqs = []
        for rec in iter_records(path):
            enc = encode_record(tokenizer, rec, ctx, template)
            if enc is not None:
                seqs.append((enc.input_ids, [lab != IGNORE_INDEX for lab in enc.labels]))
    if max_samples:
        seqs = seqs[:max_samples]
    if not any(any(m[1:]) for _, m in seqs):
        raise ConfigError(f"{path}: nothing to score (empty, or every example longer than ctx={ctx})")
    return seqs


def evaluate(model, seqs: Iterable[Seq], reference=None, desc: str = "ppl") -> dict:
    """{'ppl', 'nll', 'tokens'[, 'kl']} of `model` on the scored positions of `seqs`."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    device = next(model.parameters()).device
    nll, n, kl = 0.0, 0, 0.0
    seqs = list(seqs)
    with torch.inference_mode():
        for ids, mask in tqdm(seqs, desc=desc, unit="seq", leave=False):
            x = torch.tensor([ids], device=device)
            m = torch.tensor(mask[1:], device=device)  # position t is predicted by logits at t-1
            logp = model(x).logits[0, :-1][m].float().log_softmax(-1)
            nll += -logp.gather(-1, x[0, 1:][m][:, None]).sum().item()
            n += int(m.sum())
            if reference is not None:
                ref_logp = reference(x.to(next(reference.parameters()).device)).logits[0, :-1]
                ref_logp = ref_logp[m.to(ref_logp.device)].float().log_softmax(-1).to(logp.device)
                kl += F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()
    out = {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n}
    if reference is not None:
        out["kl"] = kl / n
    return out
