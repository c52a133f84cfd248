"""Mask-aware GPTQ: quantizing a pruned model keeps every zero zero (and so every N:M group).

Plain GPTQ destroys sparsity: after quantizing column c it spreads that column's rounding error
over the columns right of it (the OBS update), so a pruned weight picks up a non-zero value and is
then quantized to a non-zero level (llm-compressor's GPTQ after 2:4 kept 71 % of the groups).

GPTQModel 7.6 has no pruning or mask hooks, but its GPTQ column loop asks one object for every
grid decision: `GPTQ.quantizer` (find_params on each group's columns, then quantize one column at a
time, in column order when act-order / group-aware reordering are off). So inside `keep_zeros()`
each GPTQ task gets a `MaskedQuantizer` bound to its module's zero mask (weight == 0, read before
quantizing): it computes a group's scale from the weights that will survive, and returns exactly 0
for masked weights. GPTQ then propagates w - 0 for those, which is SparseGPT's joint
prune-and-quantize update (the error of zeroing a weight is compensated like a rounding error).

Zeros are exact in the checkpoint: GPTQModel packs q = round((W + zero * scale) / scale), which
is the integer zero point itself for W = 0; the zero point is an integer in [0, maxq] for both
symmetric (2^(bits-1)) and asymmetric (round(-min / scale), min <= 0) grids. As a last guard every
masked entry of the returned weights is set to 0 (and counted), whatever path GPTQModel took.

Act-order (desc_act) and GPTQModel's group-aware reordering permute the columns inside its loop;
the quantizer cannot tell which column it is given then, so sparse models are quantized in natural
column order (quantize_model refuses --desc-act and turns group-aware reordering off).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

from ..errors import ManifestError
from ..manifest import read_manifest

log = logging.getLogger(__name__)

_lock = threading.Lock()
FORCED: dict[str, int] = {}  # module name -> masked weights the last guard had to zero (0 on the normal path)


def pruning_record(model_dir: str | Path) -> dict | None:
    """The 'pruning' section of a directory's toucan.json (written by `toucan prune`, and carried
    over by `toucan quantize`), or None when the model was not pruned by toucan."""
    try:
        return read_manifest(model_dir).get("pruning")
    except ManifestError:  # no or unreadable manifest: not known to be pruned
        return None


def pruned_pattern(model_dir: str | Path) -> str | None:
    rec = pruning_record(model_dir)
    return rec.get("pattern") if rec else None


def _masked_quantizer_class():
    from gptqmodel.quantization.quantizer import Quantizer

    class MaskedQuantizer(Quantizer):
        """GPTQModel's Quantizer that keeps masked weights at exactly 0. `col` follows the column
        loop: find_params sees columns [col, col + width), quantize consumes them."""

        def bind(self, mask) -> None:
            self.keep_mask, self.col = mask, 0

        def _window(self, x):
            m = self.keep_mask[:, self.col:self.col + x.shape[1]]
            return m.to(x.device) if m.shape == x.shape else None

        def find_params(self, x, weight=False):
            m = self._window(x) if weight and x.dim() == 2 else None
            return super().find_params(x if m is None else x.masked_fill(m, 0), weight=weight)

        def quantize(self, x):
            q = super().quantize(x)
            m = self._window(x) if x.dim() == 2 else None
            self.col += x.shape[1] if x.dim() == 2 else 1
            return q if m is None else q.masked_fill(m, 0)

    return MaskedQuantizer


def _zero_mask(task):
    """True where the module's weight is 0, as [rows, columns] of GPTQ's working matrix."""
    import torch

    mask = task.module.weight.data == 0
    pad = getattr(task, "_tp_pad_cols", 0) or 0
    if pad:  # GPTQModel pads columns with zeros for tensor parallelism; padding is not a mask
        mask = torch.cat([mask, torch.zeros(mask.shape[0], pad, dtype=torch.bool, device=mask.device)], 1)
    return mask


def _guard(task, Q, mask):
    name = getattr(getattr(task, "_named_module", None), "full_name", None) or task.name
    forced = int((Q[mask[:, :Q.shape[1]]] != 0).sum()) if Q.shape == mask[:, :Q.shape[1]].shape else -1
    assert forced >= 0, (task.name, tuple(Q.shape), tuple(mask.shape))
    if forced:
        Q = Q.masked_fill(mask[:, :Q.shape[1]].to(Q.device), 0)
        log.warning("%s: %d pruned weights had become non-zero on GPTQModel's fallback path; set back to 0",
                    name, forced)
    with _lock:
        FORCED[name] = forced
    return Q


@contextlib.contextmanager
def keep_zeros():
    """While active, GPTQModel's GPTQ and RTN tasks keep every zero weight of their module at 0."""
    from gptqmodel.quantization.gptq import GPTQ
    from gptqmodel.quantization.rtn import RTN

    masked_cls = _masked_quantizer_class()
    gptq_quantize, rtn_quantize = GPTQ.quantize, RTN.quantize

    def gptq(self, *args, **kwargs):
        mask = _zero_mask(self)
        if not bool(mask.any()):
            return gptq_quantize(self, *args, **kwargs)
        assert not (self.qcfg.desc_act or getattr(self.qcfg, "act_group_aware", False)), \
            "column reordering must be off for sparse models (quantize_model turns it off)"
        # Swapping the class (not the object) keeps the buffers and settings the processor gave the
        # quantizer (configure(perchannel=True), maxq). It also turns off GPTQModel's fused CUDA
        # block update, which bypasses the quantizer (it checks `type(quantizer) is Quantizer`).
        self.quantizer.__class__ = masked_cls
        self.quantizer.bind(mask)
        Q, *rest = gptq_quantize(self, *args, **kwargs)
        return (_guard(self, Q, mask), *rest)

    def rtn(self, *args, **kwargs):
        # RTN maps 0 to the integer zero point already (round(0 / s) + z = z); the guard checks it.
        mask = _zero_mask(self)
        Q, *rest = rtn_quantize(self, *args, **kwargs)
        return (_guard(self, Q, mask), *rest) if bool(mask.any()) else (Q, *rest)

    with _lock:
        FORCED.clear()
    GPTQ.quantize, RTN.quantize = gptq, rtn
    try:
        yield FORCED
    finally:
        GPTQ.quantize, RTN.quantize = gptq_quantize, rtn_quantize
