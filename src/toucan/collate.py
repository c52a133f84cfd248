"""Batches for supervised fine-tuning: right-padded rows (SFTCollator), or examples packed into
full rows that keep their attention apart (pack_examples + PackedCollator), and the loss that
runs the LM head only where there are labels (response_loss). Used by `toucan train` and
bench/train.py; pure functions of token lists, no Trainer inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .data import IGNORE_INDEX


@dataclass
class SFTCollator:
    """Right-pad a batch: input_ids with the pad id, labels with -100, attention_mask 0 on padding.

    Labels are padded with IGNORE_INDEX explicitly rather than derived from input_ids == pad_id:
    LLaMA tokenizers often have pad == eos, and deriving the mask from the pad id would drop every
    EOS from the loss, so the model never learns to stop (the classic Alpaca/LLaMA bug)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict]) -> dict:
        import torch

        n = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            n = math.ceil(n / self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(features), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.as_tensor(f["input_ids"])
            labels[i, :k] = torch.as_tensor(f["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack_examples(examples: Sequence[dict], max_len: int) -> list[dict]:
    """Pack examples into rows of at most max_len tokens (best fit, so rows come out nearly full),
    each row with position_ids that restart at 0 for every example.

    Why this is enough to keep examples apart: with position_ids given and no attention_mask,
    transformers (masking_utils.find_packed_sequence_indices; checked on 5.24 for sdpa and eager on
    CPU, and flash-attention's varlen path on GPU) builds a block-diagonal causal mask from the
    restarts, so no token attends across an example boundary. The loss cannot cross one either:
    each example starts with a BOS whose label is -100. Hand-written rather than transformers'
    DataCollatorWithFlattening because that joins a whole batch into one row of unbounded length;
    fixed rows keep batch shapes and memory bounded and `--per_device_train_batch_size` meaning rows.
    """
    rows: list[dict] = []
    open_by_room: dict[int, list[int]] = {}   # free tokens -> rows with that much room
    for ex in examples:
        n = len(ex["input_ids"])
        assert 0 < n <= max_len, n
        room = next((r for r in range(n, max_len) if open_by_room.get(r)), None)
        if room is None:
            rows.append({"input_ids": [], "labels": [], "position_ids": []})
            i, room = len(rows) - 1, max_len
        else:
            i = open_by_room[room].pop()
        row = rows[i]
        row["input_ids"] += ex["input_ids"]
        row["labels"] += ex["labels"]
        row["position_ids"] += list(range(n))
        if room - n > 0:
            open_by_room.setdefault(room - n, []).append(i)
    return rows


@dataclass
class PackedCollator:
    """Batch packed rows. Padding is one more 'example' (position_ids restarting at 0, labels
    -100) so it forms its own attention block, and no attention_mask is sent (a 2-D mask, like a
    KV cache, switches transformers off its packed-sequence path).

    one_row=True (what `toucan train --packing` uses) joins the batch's rows into a single row,
    which needs no padding at all, and adds `logits_to_keep`: the positions whose next token is a
    label. The LM head and the loss then run only there (see response_loss), not on prompt
    tokens, whose logits would be computed and thrown away: with a 32k vocabulary the head is
    most of a small model's compute."""

    pad_token_id: int
    one_row: bool = False

    def __call__(self, features: Sequence[dict]) -> dict:
        import torch

        if self.one_row:
            cat = lambda k: torch.as_tensor([x for f in features for x in f[k]])[None]   # noqa: E731
            ids, labels, pos = cat("input_ids"), cat("labels"), cat("position_ids")
            keep = (labels[0, 1:] != IGNORE_INDEX).nonzero().squeeze(1)
            return {"input_ids": ids, "labels": labels, "position_ids": pos, "use_cache": False,
                    "logits_to_keep": keep}
        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE_INDEX, dtype=torch.long)
        pos = torch.arange(n).repeat(len(features), 1)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.as_tensor(f["input_ids"])
            labels[i, :k] = torch.as_tensor(f["labels"])
            pos[i, :k] = torch.as_tensor(f["position_ids"])
            pos[i, k:] = torch.arange(n - k)
        # use_cache=False: with a KV cache present transformers skips the packed-sequence mask and
        # lets every token attend across example boundaries (checked on 5.24)
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "use_cache": False}


def response_loss(outputs, labels, num_items_in_batch=None):
    """Causal-LM loss from logits computed only at `logits_to_keep` positions (one-row batches):
    the same per-token mean as the model's own loss (sum over label tokens / their count across
    the accumulated batch, as the Trainer passes it). A Trainer `compute_loss_func`."""
    import torch.nn.functional as F

    keep = (labels[0, 1:] != IGNORE_INDEX).nonzero().squeeze(1)
    # reshape, not logits[0]: indexing's backward writes a zero tensor the size of all the logits
    logits = outputs.logits.reshape(-1, outputs.logits.shape[-1]).float()
    assert logits.shape[0] == keep.numel(), "logits_to_keep and labels disagree"
    loss = F.cross_entropy(logits, labels[0, keep + 1], reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else max(1, keep.numel()))
