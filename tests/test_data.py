"""toucan.data: loading, validation errors, sampling specs, dedup, tokenization and `toucan data`."""

import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import toucan
from toucan import cli
from toucan.data import (IGNORE_INDEX, Record, encode_record, encode_records, iter_records, load_dataset_spec,
                         parse_spec)
from toucan.errors import ConfigError, DataError


def write_jsonl(path, objs):
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs), encoding="utf-8")
    return path


def recs(n, prefix="q"):
    return [{"instruction": f"{prefix}{i}", "input": "", "output": f"答{i}"} for i in range(n)]


# -- loading and errors -------------------------------------------------------------------------

def test_array_and_jsonl_load_the_same_records(tmp_path):
    objs = recs(5) + [{"instruction": "翻译", "input": "hello", "output": "你好", "history": [["a", "b"]]}]
    a = tmp_path / "a.json"
    a.write_text(json.dumps(objs, ensure_ascii=False, indent=2), encoding="utf-8")
    j = write_jsonl(tmp_path / "a.jsonl", objs)
    ra, rj = list(iter_records(a)), list(iter_records(j))
    key = lambda r: (r.instruction, r.input, r.output, r.history)  # noqa: E731
    assert [key(r) for r in ra] == [key(r) for r in rj] and len(ra) == 6
    assert ra[5].history == [("a", "b")] and ra[5].input == "hello"
    # every record knows where it came from: JSON Lines by line, arrays by line and index
    assert [r.line for r in rj] == [1, 2, 3, 4, 5, 6]
    assert ra[1].index == 1 and ra[1].line == 7  # indent=2: "[", then 5 lines per element
    assert ra[1].where() == f"{a}, line 7, record 1"


BAD_CASES = [
    # (file text, line, field, words in the message)
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', 2, None, "invalid JSON"),
    ('{"instruction": "a", "output": "b"}\n{"output": "b"}\n', 2, "instruction", "missing"),
    ('{"instruction": "a", "output": "b"}\n\n{"instruction": "b"}\n', 3, "output", "missing"),
    ('{"instruction": 5, "output": "b"}\n', 1, "instruction", "must be a string, got number"),
    ('{"instruction": "a", "input": ["x"], "output": "b"}\n', 1, "input", "must be a string, got array"),
    ('{"instruction": "a", "output": null}\n', 1, "output", "got null"),
    ('{"instruction": "a", "output": "  "}\n', 1, "output", "is empty"),
    ('{"instruction": "a", "output": "b", "history": [["q"]]}\n', 1, "history", "pairs"),
    ('["not an object"]\n', 1, None, "expected a JSON object"),
    ('{"instruction": "a", "output": "\\ud800"}\n', 1, "output", "surrogate"),
    ('[\n {"instruction": "a", "output": "b"},\n {"instruction": "a", "output": ""}\n]', 3, "output", "is empty"),
    ('[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "c"}\n]', 3, None, "invalid JSON"),
    ('[\n {"instruction": "a", "output": "b"}\n', 3, None, "unterminated"),
]


@pytest.mark.parametrize("text,line,field,words", BAD_CASES)
def test_bad_input_names_file_line_field(tmp_path, text, line, field, words):
    p = tmp_path / "bad.json"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as e:
        list(iter_records(p))
    err = e.value
    assert (err.file, err.line, err.field) == (str(p), line, field)
    assert words in str(err) and f"line {line}" in str(err) and str(p) in str(err)


def test_non_utf8_and_unreadable_files(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(DataError, match="line 2: not UTF-8"):
        list(iter_records(p))
    arr = tmp_path / "latin1.json"
    arr.write_bytes(b'[\n{"instruction": "caf\xe9", "output": "b"}]')
    with pytest.raises(DataError, match="line 2: not UTF-8"):
        list(iter_records(arr))
    with pytest.raises(DataError, match="cannot read file"):
        list(iter_records(tmp_path / "missing.json"))
    with pytest.raises(DataError, match="cannot read file"):
        list(iter_records(tmp_path))  # a directory


def test_skip_bad_reports_how_many_and_where(tmp_path, capsys):
    p = tmp_path / "mixed.jsonl"
    lines = [json.dumps(o) for o in recs(4)]
    lines.insert(1, "{broken")
    lines.insert(3, '{"instruction": "x"}')
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    records, report = load_dataset_spec([str(p)], skip_bad=True, shuffle=False)
    assert [r.instruction for r in records] == ["q0", "q1", "q2", "q3"]
    assert report.files[0].bad == 2
    assert report.bad[0].startswith(f"{p}, line 2: invalid JSON")
    assert report.bad[1] == f"{p}, line 4, field 'output': missing"
    # through the CLI: without --skip-bad a one-line error and exit 2, with it a report
    assert cli.main(["data", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"toucan data: error: {p}, line 2: invalid JSON (Expecting property name enclosed in double quotes)"
    assert cli.main(["data", str(p), "--skip-bad", "--stats"]) == 0
    out = capsys.readouterr().out
    assert "records: 4 kept of 4 read (2 bad skipped)" in out and f"bad: {p}, line 4, field 'output'" in out


# The loader's contract under garbage: every failure is a DataError that names the file and the
# line, never any other exception (a bare traceback for the user).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
        st.sampled_from(["instruction", "input", "output", "history", "x"]) | st.text(max_size=3), kids, max_size=4),
    max_leaves=10)


def _check_error(e: DataError, path):
    """One line that starts with the file, and names the line unless the whole file is the problem."""
    assert isinstance(e, DataError), repr(e)
    assert e.file == str(path) and str(e).startswith(str(path)) and "\n" not in str(e), str(e)
    assert e.line is not None or e.message in ("empty file (no records)",), str(e)
    if e.line is not None:
        assert f"line {e.line}" in str(e)
    if e.field is not None:
        assert f"field '{e.field}'" in str(e)


def _check_loader(path):
    try:
        for rec in iter_records(path):
            assert isinstance(rec, Record) and rec.output.strip() and rec.line is not None
    except DataError as e:
        _check_error(e, path)
    bad = []  # with skip_bad every skipped record's error has the same form
    try:
        for rec in iter_records(path, skip_bad=True, bad=bad):
            assert isinstance(rec, Record)
    except DataError as e:
        _check_error(e, path)
    for e in bad:
        _check_error(e, path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(json_values, min_size=1, max_size=5), cut=st.integers(0, 200), as_array=st.booleans())
def test_property_random_json_and_truncated_lines(tmp_path, values, cut, as_array):
    p = tmp_path / "h.json"
    if as_array:
        text = json.dumps(values, indent=1)
    else:
        lines = [json.dumps(v, ensure_ascii=False) for v in values]
        k = cut % len(lines)
        lines[k] = lines[k][: cut % (len(lines[k]) + 1)]  # a line torn anywhere
        text = "\n".join(lines)
    p.write_text(text[: len(text) - cut % 3] if as_array else text, encoding="utf-8")
    _check_loader(p)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300) | st.builds(lambda a, b: a + b, st.sampled_from(
    [b"[", b"{", b'{"instruction": "a", "output": "b"}\n', b"[" * 3000, b"\xef\xbb\xbf["]), st.binary(max_size=100)))
def test_property_random_bytes(tmp_path, data):
    p = tmp_path / "b.jsonl"
    p.write_bytes(data)
    _check_loader(p)


# Whole files, then damaged the ways real files are: cut anywhere (a full disk, a killed export),
# random bytes spliced in, an integer past Python's int-string limit (ValueError, not a
# JSONDecodeError, inside json), nesting deep enough for json's RecursionError.
good_record = st.fixed_dictionaries(
    {"instruction": st.text(min_size=1, max_size=10), "output": st.text(min_size=1, max_size=10)},
    optional={"input": st.text(max_size=5), "history": st.lists(st.lists(st.text(max_size=3), min_size=2, max_size=2),
                                                                max_size=2)})
damage = st.one_of(
    st.tuples(st.just("cut"), st.integers(0, 10_000)),
    st.tuples(st.just("bytes"), st.integers(0, 10_000), st.binary(min_size=1, max_size=20)),
    st.tuples(st.just("huge"), st.integers(0, 10_000), st.integers(4_301, 6_000)),
    st.tuples(st.just("deep"), st.integers(0, 10_000), st.integers(500, 50_000), st.sampled_from(["[", '{"a":'])),
    st.tuples(st.just("none")))


def _damage(data: bytes, how) -> bytes:
    if how[0] == "none":
        return data
    at = how[1] % (len(data) + 1)
    if how[0] == "cut":
        return data[:at]
    if how[0] == "bytes":
        return data[:at] + how[2] + data[at:]
    if how[0] == "huge":
        return data[:at] + b"9" * how[2] + data[at:]
    return data[:at] + how[3].encode() * how[2] + data[at:]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(good_record | json_values, max_size=6), as_array=st.booleans(), indent=st.sampled_from([None, 1]),
       hows=st.lists(damage, min_size=1, max_size=3))
def test_property_whole_files_damaged(tmp_path, records, as_array, indent, hows):
    if as_array:
        data = json.dumps(records, ensure_ascii=False, indent=indent).encode("utf-8")
    else:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    for how in hows:
        data = _damage(data, how)
    p = tmp_path / "whole.json"
    p.write_bytes(data)
    _check_loader(p)
    try:  # and through what `toucan data` / `toucan train` call
        load_dataset_spec([str(p)], skip_bad=True)
    except DataError as e:
        _check_error(e, p)


def test_huge_numbers_deep_nesting_and_empty_files_are_one_line_errors(tmp_path, capsys):
    ok = '{"instruction": "a", "output": "b"}'
    cases = {  # file text -> what follows the file name in the one-line error
        "huge.jsonl": (ok + '\n{"instruction": "a", "output": "b", "n": ' + "7" * 5000 + "}\n",
                       ", line 2: invalid JSON (an integer of more than 4300 digits)"),
        "huge.json": ("[" + ok + ',\n {"instruction": "a", "n": ' + "7" * 5000 + "}]",
                      ", line 2, record 1: invalid JSON (an integer of more than 4300 digits)"),
        "deep.jsonl": (ok + "\n" + '{"a": ' * 100_000 + "\n", ", line 2: invalid JSON (nested too deeply)"),
        "deep.json": ("[" + ok + ",\n" + "[" * 100_000, ", line 2, record 1: invalid JSON (nested too deeply)"),
        "empty.jsonl": ("", ": empty file (no records)"),
        "blank.json": ("\n  \n", ": empty file (no records)"),
        "syntax.json": ("[\n" + ok + ",\n" + ok + ',\n{"instruction": "e" "output": "f"}\n]',
                        ", line 4, record 2: invalid JSON (Expecting ',' delimiter)"),
        "after.json": ("[" + ok + " " + ok + "]", ", line 1, record 0: invalid JSON (expected ',' or ']' after this record)"),
    }
    for name, (text, tail) in cases.items():
        p = tmp_path / name
        p.write_text(text, encoding="utf-8")
        with pytest.raises(DataError) as e:
            list(iter_records(p))
        assert str(e.value) == f"{p}{tail}", name
        assert cli.main(["data", str(p)]) == 2, name
        assert capsys.readouterr().err == f"toucan data: error: {p}{tail}\n", name


def test_data_output_that_is_a_directory_is_refused_first(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", recs(3))
    (tmp_path / "out").mkdir()
    assert cli.main(["data", str(a), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"toucan data: error: --output {tmp_path / 'out'} is a directory: give the path of the JSON Lines file to write\n"
    assert list((tmp_path / "out").iterdir()) == []


# -- specs, sampling, dedup, shuffling ------------------------------------------------------------

def test_parse_spec(tmp_path):
    assert parse_spec("a.json") == ("a.json", None)
    assert parse_spec("a.json:0.5") == ("a.json", 0.5)
    assert parse_spec("a.json:1000") == ("a.json", 1000)
    assert parse_spec("dir:x/a.json") == ("dir:x/a.json", None)
    odd = tmp_path / "b.json:3"   # an existing file whose name ends like a count is a file
    odd.write_text("[]")
    assert parse_spec(str(odd)) == (str(odd), None)
    for bad in ("a.json:1.5", "a.json:0.0", "a.json:-3"):
        with pytest.raises(ConfigError):
            parse_spec(bad)


def test_sampling_dedup_shuffle(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", recs(100))
    b = write_jsonl(tmp_path / "b.jsonl", recs(10) + recs(30, prefix="b"))  # 10 repeat a's first 10
    r1, rep = load_dataset_spec([f"{a}:0.5", f"{b}:7"], seed=3)
    assert len(r1) == 57 and rep.records == 57
    assert [(f.read, f.duplicates, f.kept) for f in rep.files] == [(100, 0, 50), (40, 10, 7)]
    assert all(r.instruction.startswith("b") for r in r1 if r.file == str(b))
    r2, _ = load_dataset_spec([f"{a}:0.5", f"{b}:7"], seed=3)
    r3, _ = load_dataset_spec([f"{a}:0.5", f"{b}:7"], seed=4)
    assert [r.instruction for r in r1] == [r.instruction for r in r2]   # seeded
    assert [r.instruction for r in r1] != [r.instruction for r in r3]
    ordered, _ = load_dataset_spec([str(a), str(b)], shuffle=False, dedup=False)
    assert [r.instruction for r in ordered] == [f"q{i}" for i in range(100)] + [f"q{i}" for i in range(10)] + [
        f"b{i}" for i in range(30)]
    many, rep = load_dataset_spec([f"{a}:1000"])  # more than there are: all, with a warning
    assert len(many) == 100 and rep.files[0].sample == "count 1000"
    with pytest.raises(ConfigError):
        load_dataset_spec([])


# -- tokenization ---------------------------------------------------------------------------------

def test_encode_rule_and_truncation(tiny_tok):
    rec = Record(instruction="计算1+1", output="答案是2")
    full = encode_record(tiny_tok, rec, 10_000)
    n_resp = sum(1 for x in full.labels if x != IGNORE_INDEX)
    n_prompt = len(full.input_ids) - n_resp
    assert full.input_ids[0] == tiny_tok.bos_token_id and full.labels[-1] == tiny_tok.eos_token_id
    assert full.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and not full.truncated
    cut = encode_record(tiny_tok, rec, n_prompt + 2)
    assert cut.truncated and len(cut.input_ids) == n_prompt + 2
    assert cut.labels[-1] != tiny_tok.eos_token_id  # a cut answer never ends with EOS
    assert encode_record(tiny_tok, rec, n_prompt) is None  # no room for one response token



def test_bos_rule_is_written_once():
    """`[BOS] + tokens` is data.with_bos; every other place that starts a sequence calls it (a
    second copy could drift: a prompt the engine encodes unlike training did)."""
    src = Path(toucan.__file__).parent
    pattern = re.compile(r"\[\s*[\w.()]*\bbos\w*\s*\]\s*\+")  # [tok.bos_token_id] + ..., [self.bos] + ...
    copies = [(str(p.relative_to(src)), line.strip()) for p in sorted(src.rglob("*.py"))
              for line in p.read_text(encoding="utf-8").splitlines() if pattern.search(line)]
    assert copies == [("data.py", "return [bos_id] + ids")], copies


def test_encode_records_matches_one_by_one_and_filters(tiny_tok):
    rng = random.Random(0)
    records = [Record(instruction="".join(rng.choice("你好世界abc ") for _ in range(rng.randint(1, 40))),
                      output="".join(rng.choice("谢谢再见xyz1 ") for _ in range(rng.randint(1, 60))) + "。",
                      input=rng.choice(["", "输入"])) for _ in range(60)]
    kept, enc, rep = encode_records(tiny_tok, records, 64)
    singles = [encode_record(tiny_tok, r, 64) for r in records]
    assert [(e.input_ids, e.labels, e.truncated) for e in enc] == [
        (e.input_ids, e.labels, e.truncated) for e in singles if e is not None]
    assert rep.truncated == sum(e.truncated for e in singles if e) > 0
    assert len(rep.lengths) == 60 and rep.percentiles()["max"] == max(rep.lengths)
    kept2, enc2, rep2 = encode_records(tiny_tok, records, 64, drop_too_long=True)
    assert len(kept2) == sum(n <= 64 for n in rep.lengths) and rep2.dropped_too_long == 60 - len(kept2)
    assert all(not e.truncated for e in enc2)
    _, _, rep3 = encode_records(tiny_tok, records, 10_000, min_response_tokens=10)
    resp_tokens = [sum(x != IGNORE_INDEX for x in encode_record(tiny_tok, r, 10_000).labels) - 1 for r in records]
    assert rep3.dropped_short == sum(n < 10 for n in resp_tokens) > 0


def test_cli_output_writes_cleaned_jsonl(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", recs(20) + recs(5))  # 5 duplicates
    out = tmp_path / "clean.jsonl"
    assert cli.main(["data", f"{a}:0.5", "--no-shuffle", "--output", str(out),
                     "--tokenizer", "tests/fixtures/tiny_tokenizer"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 10 and len({r["instruction"] for r in rows}) == 10
    assert set(rows[0]) == {"instruction", "input", "output"}
    assert "wrote 10 records" in capsys.readouterr().out
    assert cli.main(["data", str(a), "--drop_too_long"]) == 2  # needs a tokenizer to count tokens


def test_huge_record_is_cut_before_tokenizing_with_the_same_result(tiny_tok, tmp_path, capsys):
    """A multi-MB record: only what can be kept is tokenized (cut in characters first), the kept
    tokens are exactly those of tokenizing it whole, and the cut is reported."""
    from toucan.data import CUT_MARGIN, chars_per_token

    rng = random.Random(1)
    huge = "".join(rng.choice("你好世界，谢谢。abc xyz 123\n") for _ in range(2_000_000))
    records = [Record(instruction="写长文", output=huge), Record(instruction=huge, output="好"),
               Record(instruction="短", output="答案")]
    kept, enc, rep = encode_records(tiny_tok, records, 64)
    whole = [encode_record(tiny_tok, r, 64) for r in records]  # one call per record, nothing cut
    assert whole[1] is None and kept == [records[0], records[2]]  # the huge prompt leaves no room, both ways
    assert [(e.input_ids, e.labels, e.truncated) for e in enc] == [
        (e.input_ids, e.labels, e.truncated) for e in whole if e is not None]
    assert rep.cut_before_tokenizing == 2 and rep.cut_chars == chars_per_token(tiny_tok) * (64 + CUT_MARGIN)
    assert rep.truncated == 1 and rep.dropped_no_room == 1 and min(rep.lengths[:2]) > 64

    p = write_jsonl(tmp_path / "huge.jsonl", [{"instruction": "写长文", "output": huge}, {"instruction": "短", "output": "答"}])
    assert cli.main(["data", str(p), "--tokenizer", "tests/fixtures/tiny_tokenizer", "--max-len", "64", "--stats"]) == 0
    out = capsys.readouterr().out
    assert f"cut before tokenizing (over {rep.cut_chars} characters, far beyond max_len): 1 record(s)" in out
