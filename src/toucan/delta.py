"""Delta weights: `toucan make-delta`, `apply-delta`, `check-delta`.

LLaMA's licence forbids publishing fine-tuned full weights, so Toucan publishes a delta that only
restores the model together with the original base. Everything here is streamed tensor by tensor
(toucan.delta_io): memory is about one tensor of each input plus the one being written,
independent of model size.

Representation (why the round trip is bit-exact): for every tensor the delta stores the XOR of the
target's and the base's bit patterns, as integers of the same width (int32 for fp32, int16 for
fp16/bf16). XOR is a lossless bitwise difference: target = base ^ (target ^ base) holds bit for bit
in every dtype, including NaNs, infinities, -0.0 and subnormals, with no rounding anywhere (a float
difference t - b in fp32 is not exact for fp16/bf16 pairs of distant magnitude, and t - b in the
target dtype loses bits). Weights near their base share sign and exponent, so the high bits of the
delta are mostly zero and the delta compresses well. A base of another dtype is first converted to
the target's dtype (deterministic), then XORed.

Vocabulary rows: where the target's embed_tokens / lm_head has more rows than the base's (the
Chinese vocabulary, an added [PAD]), the shared rows hold the XOR and the extra rows hold the
target's bits as they are (XOR with nothing); `base_rows` in the manifest records the split. Any
other shape mismatch is an error naming the tensor and both shapes. Tied embeddings: a target
lm_head over a base without one (tied) is taken relative to the base's embed_tokens.

Checksums (all in the delta's toucan.json, under "delta"): sha256 of every base tensor used (raw
bytes, so a safetensors and a .bin copy of the same base agree), of every target tensor and of
every file of the restored target, plus an xxh3-128 beside each tensor's sha256. apply-delta hashes
the whole base before writing anything and names the first tensor that differs; it rebuilds the
target's safetensors files byte for byte (same headers, same data) and checks every restored tensor
as it writes it, so a corrupted delta is caught too, and the output directory appears only when all
of it matched. By default those two passes use the xxh3-128 digests: sha256 runs at ~0.55 GB/s on
this 2-core machine, so two sha256 passes alone took several times longer than copying the model;
xxh3-128 (3.6 GB/s, the `xxhash` package) detects any accidental
difference just as well. `--verify_sha256` uses the sha256 instead; check-delta always does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .delta_io import (DIGESTS, INT_OF_WIDTH, ST_NAME, ShardWriter, Weights, bits, hashed_in_order,
                       is_contiguous_file, make_header, raw_bytes, sha256_tensor, st_dtype, tensors_in_file_order,
                       xxh3_tensor)
from .errors import ConfigError, DeltaError
from .fsutil import atomic_dir, check_output, sha256_file
from .manifest import read_manifest, verify_manifest, write_manifest

log = logging.getLogger(__name__)

FORMAT = "toucan-delta/1"
DELTA_INDEX = "delta.safetensors.index.json"
VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")  # the only tensors whose rows may grow
TIED_SOURCE = {"lm_head.weight": "model.embed_tokens.weight"}
# Never copied between model and delta directories: weights (ours are regenerated, pickles are
# never passed on) and manifests (each directory gets its own).
SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
SKIP_NAMES = {"toucan.json", "pytorch_model.bin.index.json", DELTA_INDEX}


def parse_size(size: str) -> int:
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        return parse_size_to_int(size)
    except ValueError as e:
        raise ConfigError(f"--max_shard_size {size!r}: {e}") from None


def _nbytes(dtype: torch.dtype, shape: list[int]) -> int:
    return dtype.itemsize * int(torch.Size(shape).numel())


def _shards(names: list[str], sizes: dict[str, int], max_size: int) -> list[list[str]]:
    """Consecutive groups of at most max_size bytes (a bigger tensor gets a shard of its own)."""
    groups: list[list[str]] = [[]]
    used = 0
    for n in names:
        if groups[-1] and used + sizes[n] > max_size:
            groups.append([])
            used = 0
        groups[-1].append(n)
        used += sizes[n]
    return groups


def _shard_name(stem: str, i: int, n: int) -> str:
    return f"{stem}.safetensors" if n == 1 else f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"


def _copy_files(src: Path, dst: Path, keep_index: bool) -> list[str]:
    copied = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name in SKIP_NAMES or f.name.endswith(SKIP_SUFFIXES):
            continue
        if f.name == "model.safetensors.index.json" and not keep_index:
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied


# ---------------------------------------------------------------------------------------------
# make-delta

def _plan(base: Weights, target: Weights) -> tuple[dict[str, dict], list[str]]:
    """Per target tensor: its dtype/shape, which base tensor it is relative to, how many rows are
    shared. Raises on any shape that does not fit, before anything is written."""
    plan, notes = {}, []
    for name in target.names:
        dtype, shape = target.meta[name]
        bname = name if name in base.meta else TIED_SOURCE.get(name)
        if bname not in base.meta:
            bname = None
            notes.append(f"{name}: not in the base, stored as it is")
        elif bname != name:
            notes.append(f"{name}: the base has none (tied embeddings), taken relative to the base's {bname}")
        rows = None
        if bname is not None:
            bshape = base.meta[bname][1]
            if bshape != shape:
                grows = (name.endswith(VOCAB_TENSORS) and len(bshape) == len(shape) == 2
                         and bshape[1] == shape[1] and shape[0] > bshape[0])
                if not grows:
                    raise DeltaError(f"tensor {name}: target shape {tuple(shape)} does not fit base shape "
                                     f"{tuple(bshape)} (only embed_tokens/lm_head may gain vocabulary rows)")
                rows = bshape[0]
                notes.append(f"{name}: {bshape[0]} base rows, {shape[0] - bshape[0]} new rows stored as they are")
        plan[name] = {"dtype": ST_NAME[dtype], "shape": shape, "base": bname, "base_rows": rows}
    for name in base.names:
        if name not in target.meta and name not in TIED_SOURCE.values():
            notes.append(f"{name}: in the base only (the target ties it or dropped it)")
    return plan, notes


def _target_layout(target: Weights, max_size: int) -> tuple[list[dict], bytes | None]:
    """The files apply-delta will write. Safetensors targets keep their own files and headers
    (so the restored files are byte-identical); others get bounded safetensors shards + index."""
    if target.is_safetensors and all(is_contiguous_file(f, *target.headers[f]) for f in target.files):
        return [{"file": f.name, "header": target.headers[f][0].decode("utf-8"),
                 "tensors": tensors_in_file_order(target.headers[f][1])} for f in target.files], None
    sizes = {n: _nbytes(*target.meta[n]) for n in target.names}
    groups = _shards(target.names, sizes, max_size)
    layout = [{"file": _shard_name("model", i, len(groups)),
               "header": make_header([(n, *target.meta[n]) for n in g], {"format": "pt"}).decode("utf-8"),
               "tensors": g} for i, g in enumerate(groups)]
    index = {"metadata": {"total_size": sum(sizes.values())},
             "weight_map": {n: e["file"] for e in layout for n in e["tensors"]}}
    return layout, (json.dumps(index, indent=2) + "\n").encode()


def make_delta(base_dir, target_dir, delta_dir, max_shard_size: str = "2GB", config=None,
               overwrite: bool = False) -> dict:
    inputs = [base_dir, target_dir]
    check_output(delta_dir, overwrite=overwrite, inputs=inputs)
    base, target = Weights(base_dir), Weights(target_dir)
    plan, notes = _plan(base, target)
    max_size = parse_size(max_shard_size)
    layout, index = _target_layout(target, max_size)
    order = [n for e in layout for n in e["tensors"]]
    sizes = {n: _nbytes(*target.meta[n]) for n in order}
    groups = _shards(order, sizes, max_size)
    delta_file = {n: _shard_name("delta", i, len(groups)) for i, g in enumerate(groups) for n in g}
    base_sums: dict[str, dict] = {}
    known: dict[str, str] = {}
    # sha256 of each restored target file: its header, then its tensors' bytes in order.
    file_sha = {e["file"]: hashlib.sha256(struct.pack("<Q", len(e["header"].encode())) + e["header"].encode())
                for e in layout}
    file_of = {n: e["file"] for e in layout for n in e["tensors"]}
    with atomic_dir(delta_dir, overwrite=overwrite, inputs=inputs) as tmp:
        copied = _copy_files(target.dir, tmp, keep_index=index is None)
        if index is not None:
            (tmp / "model.safetensors.index.json").write_bytes(index)
        bar = tqdm(total=len(order), desc="make-delta", unit="tensor")
        for group in groups:
            writer = ShardWriter(tmp / delta_file[group[0]], make_header(
                [(n, INT_OF_WIDTH[target.meta[n][0].itemsize], target.meta[n][1]) for n in group],
                {"format": FORMAT}))
            try:
                for name in group:
                    p = plan[name]
                    t = target.get(name)
                    p["sha256"], p["xxh3_128"] = sha256_tensor(t), xxh3_tensor(t)
                    file_sha[file_of[name]].update(raw_bytes(t))
                    d = bits(t).clone()  # .bin tensors are memory-mapped: never XOR them in place
                    if p["base"] is not None:
                        b = base.get(p["base"])
                        if p["base"] not in base_sums:
                            base_sums[p["base"]] = {"dtype": ST_NAME[b.dtype], "shape": list(b.shape),
                                                    "sha256": sha256_tensor(b), "xxh3_128": xxh3_tensor(b)}
                        shared = d if p["base_rows"] is None else d[:p["base_rows"]]
                        shared ^= bits(b.to(t.dtype))
                    writer.write(d)
                    bar.update()
            finally:
                known[writer.path.name] = writer.close()
        bar.close()
        target_files = {f: h.hexdigest() for f, h in file_sha.items()}
        for name in copied + (["model.safetensors.index.json"] if index is not None else []):
            target_files[name] = sha256_file(tmp / name)
        weight_map = {"metadata": {"format": FORMAT}, "weight_map": delta_file}
        (tmp / DELTA_INDEX).write_text(json.dumps(weight_map, indent=2) + "\n")
        info = {"format": FORMAT, "method": "xor", "base": base_sums, "tensors": plan,
                "target_files": target_files, "layout": layout, "notes": notes}
        write_manifest(tmp, "make-delta", config, extra={"delta": info}, known=known)
    for n in notes:
        log.info("%s", n)
    return info


# ---------------------------------------------------------------------------------------------
# apply-delta

def read_delta_info(delta_dir) -> dict:
    info = read_manifest(delta_dir).get("delta")
    if not info or info.get("format") != FORMAT:
        raise DeltaError(f"{delta_dir}: not a delta written by toucan make-delta ({FORMAT})")
    return info


def delta_weights(delta_dir) -> Weights:
    d = Path(delta_dir)
    if not (d / DELTA_INDEX).is_file():
        raise DeltaError(f"{d}: {DELTA_INDEX} is missing")
    files = dict.fromkeys(json.loads((d / DELTA_INDEX).read_text())["weight_map"].values())
    missing = [f for f in files if not (d / f).is_file()]
    if missing:
        raise DeltaError(f"{d}: delta files missing: {', '.join(missing)}")
    return Weights(d, files=[d / f for f in files])


def check_base(base: Weights, info: dict, algo: str = "xxh3_128") -> None:
    """Raise DeltaError naming the first base tensor that is not the one the delta was made from."""
    expected = info["base"]
    for name, e in expected.items():  # cheap checks first
        if name not in base.meta:
            raise DeltaError(f"wrong base: {base.dir} has no tensor {name}")
        dtype, shape = base.meta[name]
        if ST_NAME[dtype] != e["dtype"] or shape != e["shape"]:
            raise DeltaError(f"wrong base: tensor {name} is {ST_NAME[dtype]} {tuple(shape)} in {base.dir}, "
                             f"the delta was made from {e['dtype']} {tuple(e['shape'])}")
    order = [n for n in base.names if n in expected]
    for name, digest in tqdm(hashed_in_order(base, order, algo), total=len(order), desc="checking base",
                             unit="tensor"):
        if digest != expected[name][algo]:
            raise DeltaError(f"wrong base: tensor {name} of {base.dir} differs from the base this delta was "
                             f"made from ({algo} {digest[:16]}... != {expected[name][algo][:16]}...)")


def _restore(name: str, p: dict, delta: Weights, base: Weights, buf: torch.Tensor) -> torch.Tensor:
    """The target tensor `name`, computed into the reusable byte buffer `buf`."""
    dtype = st_dtype(p["dtype"], name)
    d = delta.get(name)  # memory-mapped: read only
    if d.dtype != INT_OF_WIDTH[dtype.itemsize] or list(d.shape) != p["shape"]:
        raise DeltaError(f"{delta.where[name]}: tensor {name} is {ST_NAME[d.dtype]} {tuple(d.shape)}, "
                         f"expected {ST_NAME[INT_OF_WIDTH[dtype.itemsize]]} {tuple(p['shape'])}: corrupted delta")
    out = buf[:d.numel() * dtype.itemsize].view(d.dtype).view(d.shape)
    if p["base"] is None:
        out.copy_(d)
    else:
        b = bits(base.get(p["base"]).to(dtype))
        rows = p["base_rows"] if p["base_rows"] is not None else d.shape[0]
        torch.bitwise_xor(d[:rows], b, out=out[:rows])
        out[rows:].copy_(d[rows:])  # new vocabulary rows: stored as they are
    return out.view(dtype)


def apply_delta(base_dir, delta_dir, target_dir, config=None, verify_sha256: bool = False,
                overwrite: bool = False) -> None:
    """Restore the target. Base and restored tensors are checked against the xxh3-128 recorded
    beside each sha256 (same detection of accidental differences, ~7x faster to compute), or
    against the sha256 themselves with verify_sha256."""
    algo = "sha256" if verify_sha256 else "xxh3_128"
    inputs = [base_dir, delta_dir]
    check_output(target_dir, overwrite=overwrite, inputs=inputs)  # before hashing the whole base
    info = read_delta_info(delta_dir)
    delta = delta_weights(delta_dir)
    base = Weights(base_dir)
    check_base(base, info, algo)  # before anything is written
    with atomic_dir(target_dir, overwrite=overwrite, inputs=inputs) as tmp, ThreadPoolExecutor(2) as hashers:
        copied = _copy_files(Path(delta_dir), tmp, keep_index=True)
        bad = [f for f in copied if f in info["target_files"] and sha256_file(tmp / f) != info["target_files"][f]]
        bad += [f for f in info["target_files"] if not (tmp / f).is_file() and f not in
                {e["file"] for e in info["layout"]}]
        # Each restored tensor is hashed (in parallel, per tensor) against the target's digest while
        # a writer thread writes it after the target's own header: every tensor matching means every
        # file is byte-identical to the target's, so the files' recorded sha256 hold for the manifest.
        # Outputs go through RING reused buffers: fresh multi-100-MB allocations cost more in page
        # faults than the XOR itself. A buffer is reused once its write and hash are done.
        largest = max(_nbytes(st_dtype(p["dtype"], n), p["shape"]) for n, p in info["tensors"].items())
        ring = [torch.empty(largest, dtype=torch.uint8) for _ in range(3)]
        busy: list[list] = [[] for _ in ring]
        checks: deque = deque()
        bar = tqdm(total=len(info["tensors"]), desc="apply-delta", unit="tensor")
        k = 0
        for e in info["layout"]:
            writer = ShardWriter(tmp / e["file"], e["header"].encode("utf-8"), hash=False)
            try:
                for name in e["tensors"]:
                    i = k % len(ring)
                    for fut in busy[i]:
                        fut.result()
                    t = _restore(name, info["tensors"][name], delta, base, ring[i])
                    h = hashers.submit(DIGESTS[algo], t)
                    busy[i] = [h, writer.write(t)]
                    checks.append((name, h))
                    k += 1
                    bar.update()
            finally:
                writer.close()
        bar.close()
        bad += [name for name, h in checks if h.result() != info["tensors"][name][algo]]
        if bad:
            raise DeltaError(f"the restored target does not match the delta's checksums ({', '.join(bad)}): "
                             f"the base was verified, so {delta_dir} is corrupted; nothing was written")
        known = {e["file"]: info["target_files"][e["file"]] for e in info["layout"]}
        write_manifest(tmp, "apply-delta", config, known=known,
                       extra={"delta": {"format": FORMAT, "base": str(base_dir), "delta": str(delta_dir),
                                        "target_files_verified": True}})


# ---------------------------------------------------------------------------------------------
# check-delta

def _compare(weights: Weights, expected: dict[str, dict], what: str) -> list[tuple[str, str, str]]:
    present = [n for n in weights.names if n in expected]
    rows = [("MISSING", what, n) for n in expected if n not in weights.meta]
    for name, digest in tqdm(hashed_in_order(weights, present), total=len(present), desc=what, unit="tensor"):
        rows.append(("match" if digest == expected[name]["sha256"] else "MISMATCH", what, name))
    return rows


def check_delta(base_dir, delta_dir, target_dir=None) -> list[tuple[str, str, str]]:
    """Rows (status, what, name): status is match / MISMATCH / MISSING; what is delta / base / target."""
    info = read_delta_info(delta_dir)
    rows = [("MISMATCH", "delta", problem) for problem in verify_manifest(delta_dir)]
    if not rows:
        rows.append(("match", "delta", f"{delta_dir} (every file matches toucan.json)"))
    rows += _compare(Weights(base_dir), info["base"], "base")
    if target_dir is not None:
        rows += _compare(Weights(target_dir), info["tensors"], "target")
    return rows
