"""toucan.data on Meta's LLaMA tokenizer (../shared) and Chinese Alpaca data: the training rule
    input_ids = [BOS] + tokens(prompt) + tokens(output) + [EOS], prompt tokens masked with -100
checked on every record, and `toucan data` through the CLI."""

import json
import re

import pytest

from conftest import shared_path
from toucan import cli
from toucan.data import IGNORE_INDEX, encode_text, iter_records, record_prompt
from toucan.data import encode_record

ALPACA_ZH = "data/alpaca/alpaca_zh_demo.json"


@pytest.fixture(scope="module")
def zh_records():
    return list(iter_records(shared_path(ALPACA_ZH)))


def test_llama_special_ids(llama_tok):
    assert (llama_tok.bos_token_id, llama_tok.eos_token_id) == (1, 2)
    assert llama_tok.convert_ids_to_tokens([1, 2]) == ["<s>", "</s>"]
    assert len(llama_tok) == 32000


def test_dummy_prefix_rule(llama_tok):
    # SentencePiece prepends '▁' to every separately encoded text. The response is encoded on its
    # own, so it starts with that prefix: a lone '▁' (29871) before CJK, fused ('▁Hello') before
    # Latin. Decoding a response on its own removes exactly that one space, and a real leading
    # space survives (it is encoded as a second '▁'). That is what makes the round trip exact.
    assert llama_tok.convert_ids_to_tokens(encode_text(llama_tok, "你好")) == ["▁", "你", "好"]
    assert llama_tok.convert_ids_to_tokens(encode_text(llama_tok, "Hello")) == ["▁Hello"]
    for text in ["你好", "Hello", " leading space", "  two", "\n换行", "末尾空格 ", "1. 第一\n2. 第二"]:
        assert llama_tok.decode(encode_text(llama_tok, text)) == text


def test_label_masking_on_every_chinese_record(llama_tok, zh_records):
    assert len(zh_records) == 1000
    for rec in zh_records:
        prompt_ids = encode_text(llama_tok, record_prompt(rec))
        response_ids = encode_text(llama_tok, rec.output)
        enc = encode_record(llama_tok, rec, max_len=100_000)
        n_prompt = 1 + len(prompt_ids)
        # the rule, id for id
        assert enc.input_ids == [1] + prompt_ids + response_ids + [2], rec.where()
        assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt, rec.where()  # BOS masked too
        unmasked = [x for x in enc.labels if x != IGNORE_INDEX]
        assert unmasked == enc.input_ids[n_prompt:] and unmasked[-1] == 2
        # decoded unmasked labels are exactly the output followed by EOS
        assert llama_tok.decode(unmasked) == rec.output + "</s>", rec.where()
        assert llama_tok.decode(unmasked[:-1]) == rec.output, rec.where()
        assert llama_tok.decode(enc.input_ids[1:n_prompt]) == record_prompt(rec), rec.where()


def test_truncation_keeps_mask_and_drops_eos(llama_tok, zh_records):
    long = max(zh_records, key=lambda r: len(r.output))
    enc = encode_record(llama_tok, long, max_len=256)
    assert enc.truncated and len(enc.input_ids) == 256 and enc.labels[-1] != 2
    assert llama_tok.decode([x for x in enc.labels if x != IGNORE_INDEX]) == \
        llama_tok.decode(encode_text(llama_tok, long.output)[: 256 - 1 - len(encode_text(llama_tok, record_prompt(long)))])


def test_cli_stats_prints_percentiles(llama_tok, capsys):
    path, tok = shared_path(ALPACA_ZH), shared_path("tokenizers/llama_tokenizer.model")
    assert cli.main(["data", str(path), "--tokenizer", str(tok), "--stats", "--max_len", "512"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"token length \(BOS \+ prompt \+ response \+ EOS\): p50 (\d+), p90 (\d+), p95 (\d+), "
                  r"p99 (\d+), max (\d+), mean ([\d.]+)", out)
    assert m, out
    p50, p90, p95, p99, mx = map(int, m.groups()[:5])
    assert 0 < p50 <= p90 <= p95 <= p99 <= mx
    # the figures are real: recompute them from the records (dedup on: 992 unique records)
    records = list(iter_records(path))
    unique = {(r.instruction, r.input, r.output): r for r in records}
    lengths = sorted(len(encode_record(llama_tok, r, 100_000).input_ids) for r in unique.values())
    assert len(lengths) == 992 and mx == lengths[-1] and p50 == lengths[(len(lengths) + 1) // 2 - 1]
    over = sum(n > 512 for n in lengths)
    assert f"records: 992 kept of 1000 read" in out and f"over max_len 512: {over} ({over} truncated" in out


@pytest.mark.parametrize("as_array", [False, True])
def test_cli_broken_line_7(tmp_path, capsys, zh_records, as_array):
    objs = [{"instruction": r.instruction, "input": r.input, "output": r.output} for r in zh_records[:12]]
    lines = [json.dumps(o, ensure_ascii=False) for o in objs]
    if as_array:  # one element per line: "[", elements on lines 2..13, "]"
        lines = ["["] + [x + "," for x in lines[:-1]] + [lines[-1], "]"]
    lines[6] = lines[6][: len(lines[6]) // 2]  # line 7 torn in the middle
    p = tmp_path / ("broken.json" if as_array else "broken.jsonl")
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert cli.main(["data", str(p), "--stats"]) == 2
    err = capsys.readouterr().err.strip()
    # an array element also names its index (0-based): "[" is line 1, so line 7 holds record 5
    where = f"{p}, line 7, record 5" if as_array else f"{p}, line 7"
    assert err.startswith(f"toucan data: error: {where}: invalid JSON") and "\n" not in err
    if not as_array:  # JSON Lines can skip it and go on
        assert cli.main(["data", str(p), "--skip-bad", "--stats"]) == 0
        assert f"bad: {p}, line 7: invalid JSON" in capsys.readouterr().out
