"""`toucan tokenizer extend`: the Chinese-LLaMA merge (49,953 pieces), and the tokenizers toucan and
AutoTokenizer load from the result giving exactly SentencePiece's ids (issue 13)."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm

from conftest import TINY_TOKENIZER, shared_path
from toucan import cli
from toucan.manifest import verify_manifest
from toucan.modeling import load_tokenizer
from toucan.tokenizer import extend, load_slow_tokenizer, read_model_proto

# Leading/double spaces, newlines, mixed scripts, full-width punctuation, rare characters (byte
# fallback), special tokens inside text: where slow and fast Llama tokenizers have disagreed.
TEXTS = ["你好，请介绍一下你自己。", "  两个前导空格", " 前导空格", "中文和English混合，数字12345。\n\n第二段\t制表符",
         "龘靐齉爩 😀 ㊗️", "“引号”……——《书名》", "请把下面的句子翻译成英文：我们一起学习机器学习吧！",
         "结尾空格  ", "a</s>b <s> 中", ""]


def assert_same_ids(out_dir, texts, fast=None, slow=None):
    fast, slow = fast or load_tokenizer(out_dir), slow or load_slow_tokenizer(out_dir)
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))
    assert len(fast) == len(slow) == sp.get_piece_size()
    fast_ids = fast(texts).input_ids
    for text, ids in zip(texts, fast_ids):
        assert ids == slow(text).input_ids, text
        if "<s>" not in text and "</s>" not in text:  # SentencePiece reads those as plain text
            assert ids == [sp.bos_id()] + sp.encode(text), text
    return fast


@pytest.fixture(scope="module")
def chinese_llama(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "chinese-llama"
    stats = extend(shared_path("tokenizers/llama_tokenizer.model"), shared_path("tokenizers/chinese_sp.model"), out)
    return out, stats, load_tokenizer(out), load_slow_tokenizer(out)


def test_chinese_llama_merge(chinese_llama):
    out, stats, fast, slow = chinese_llama
    assert stats == {"base_pieces": 32000, "add_pieces": 20000, "appended": 17953, "pieces": 49953}
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.model", "tokenizer_config.json", "toucan.json"]
    assert verify_manifest(out) == []
    assert_same_ids(out, TEXTS, fast, slow)
    assert len(fast) == 49953
    assert fast.tokenize("你好，请介绍一下你自己。") == ["▁你好", "，", "请", "介绍一下", "你自己", "。"]
    assert slow.tokenize("你好，请介绍一下你自己。") == fast.tokenize("你好，请介绍一下你自己。")
    assert fast.decode(fast("中文和English混合").input_ids, skip_special_tokens=True) == "中文和English混合"


def test_chinese_llama_on_alpaca_zh(chinese_llama):
    """All 1,000 alpaca_zh_demo records (instruction + input + output, as one text and field by field):
    toucan's tokenizer and what AutoTokenizer builds from the directory (as downstream tools load it)
    give exactly SentencePiece's ids. The 17,953 appended pieces all score 0, and SentencePiece breaks
    score ties by position: a tokenizer.json (tokenizers' BPE, ties by merge rank) cut 685 of these
    records differently (see toucan/tokenizer.py)."""
    from transformers import AutoTokenizer

    out, _, tok, _ = chinese_llama
    auto = AutoTokenizer.from_pretrained(str(out))
    assert type(auto).__name__ == "SentencePieceBackend"
    records = json.loads(shared_path("data/alpaca/alpaca_zh_demo.json").read_text(encoding="utf-8"))
    assert len(records) == 1000
    texts = [r["instruction"] + ("\n" + r["input"] if r["input"] else "") + "\n" + r["output"] for r in records]
    texts += [r[k] for r in records for k in ("instruction", "input", "output") if r[k]]
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    want = [sp.encode(t) for t in texts]
    assert tok(texts, add_special_tokens=False).input_ids == want
    assert auto(texts, add_special_tokens=False).input_ids == want
    assert tok(texts[:50]).input_ids == [[sp.bos_id()] + w for w in want[:50]]
    assert all(tok.decode(w) == t for w, t in zip(want[:200], texts[:200]))


def test_merge_order_scores_and_cli(tmp_path, capsys):
    """No ../shared needed: the repo's tiny tokenizer extended with a small Chinese model."""
    corpus = tmp_path / "zh.txt"
    corpus.write_text("\n".join(["机器学习是人工智能的一个分支。", "深度学习模型需要大量数据。",
                                 "自然语言处理让计算机理解人类语言。", "今天天气很好，我们去公园散步吧。"] * 50),
                      encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "zh"), vocab_size=120,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2, num_threads=1)
    base, add = TINY_TOKENIZER / "tokenizer.model", tmp_path / "zh.model"
    out = tmp_path / "merged"
    assert cli.main(["tokenizer", "extend", "--base", str(base), "--add", str(add), "--output", str(out)]) == 0
    assert "pieces (1000 base + " in capsys.readouterr().out
    b, a, m = read_model_proto(base), read_model_proto(add), read_model_proto(out / "tokenizer.model")
    have = {p.piece for p in b.pieces}
    expected = [p.piece for p in a.pieces if p.piece not in have]
    assert expected and [p.piece for p in m.pieces] == [p.piece for p in b.pieces] + expected
    assert all(p.score == 0 for p in m.pieces[len(b.pieces):])
    assert [(p.piece, p.score, p.type) for p in m.pieces[:len(b.pieces)]] == [(p.piece, p.score, p.type)
                                                                            for p in b.pieces]
    assert json.loads((out / "toucan.json").read_text())["tokenizer"]["appended"] == len(expected)
    assert_same_ids(out, TEXTS + ["机器学习是人工智能的一个分支。 深度学习"])
    # A file that is not a SentencePiece model: one clear line, non-zero exit, nothing written.
    (tmp_path / "bad.model").write_bytes(b"not a model")
    assert cli.main(["tokenizer", "extend", "--base", str(tmp_path / "bad.model"), "--add", str(add),
                     "--output", str(tmp_path / "bad")]) == 2
    assert "bad.model: not a SentencePiece model" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_sentencepiece_tokenizer_pickles_and_decodes_bytes(tiny_tok):
    """toucan's tokenizer survives pickling (DataLoader workers, datasets' num_proc) and decodes
    byte-fallback pieces as SentencePiece does (transformers 5.24's SentencePieceBackend gives '<0x0A>')."""
    import pickle

    again = pickle.loads(pickle.dumps(tiny_tok))
    text = "a\n\nb 😀 中文"
    assert again(text).input_ids == tiny_tok(text).input_ids
    assert again.decode(again(text).input_ids, skip_special_tokens=True) == text
