"""`toucan eval generate --api-url` against a real `toucan serve` process on 127.0.0.1 (with a key):
its greedy answers equal in-process generation exactly, through /v1/completions and --chat."""

import pytest

from conftest import free_port
from test_api import KEY, start_server
from test_eval import _mini_set
from toucan import cli
from toucan.eval.items import read_records

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("eval-api")
    proc, base = start_server(["--model", str(tiny_model_dir), "--api-key", KEY, "--max_batch_size", "4",
                               "--batch_wait_ms", "20", "--device", "cpu"], free_port(), d / "server.log")
    yield base
    proc.terminate()
    proc.wait(timeout=20)


def _args(eval_set, out, *extra):
    # repetition penalty and min tokens are sent too (toucan serve and vLLM take them)
    return ["eval", "generate", "--eval-set", str(eval_set), "--output", str(out), "--max-new-tokens", "10",
            "--min-new-tokens", "3", "--repetition-penalty", "1.3", *extra]


def _answers(path):
    return {a["id"]: (a["answer"], a["completion_tokens"], a["finish_reason"]) for a in read_records(path, "answers")[1]}


def test_api_answers_equal_in_process_greedy(served, tiny_model_dir, tmp_path, monkeypatch):
    eval_set = _mini_set(tmp_path / "set.jsonl", per_class=1)
    local = tmp_path / "local.jsonl"
    assert cli.main(_args(eval_set, local, "--model", str(tiny_model_dir), "--device", "cpu", "--batch-size", "4")) == 0
    want = _answers(local)
    assert len(want) == 10 and any(a for a, _, _ in want.values())

    monkeypatch.setenv("TOUCAN_TEST_KEY", KEY)
    api = tmp_path / "api.jsonl"
    # killed after 3 answers: the rerun resumes (the key from the environment, not the command line)
    assert cli.main(_args(eval_set, api, "--api-url", served + "/v1", "--api-key-env", "TOUCAN_TEST_KEY",
                          "--concurrency", "4", "--limit", "3")) == 0
    assert cli.main(_args(eval_set, api, "--api-url", served + "/v1", "--api-key-env", "TOUCAN_TEST_KEY",
                          "--concurrency", "4")) == 0
    meta, recs = read_records(api, "answers")
    assert meta["model"] == tiny_model_dir.name and meta["endpoint"] == "/v1/completions"
    assert meta["generation"] == read_records(local, "answers")[0]["generation"]
    assert len(recs) == 10 and _answers(api) == want

    chat = tmp_path / "chat.jsonl"
    assert cli.main(_args(eval_set, chat, "--api-url", served + "/v1", "--api-key", KEY, "--chat",
                          "--served-model", tiny_model_dir.name)) == 0
    assert read_records(chat, "answers")[0]["endpoint"] == "/v1/chat/completions"
    assert _answers(chat) == want
    # resuming the completions file through chat would mix two kinds of answers: refused
    assert cli.main(_args(eval_set, api, "--api-url", served + "/v1", "--api-key", KEY, "--chat")) == 2


def test_api_refusals(served, tiny_model_dir, tmp_path, capsys):
    eval_set = _mini_set(tmp_path / "set.jsonl", per_class=1)
    out = tmp_path / "a.jsonl"
    both = _args(eval_set, out, "--model", str(tiny_model_dir), "--api-url", served + "/v1")
    assert cli.main(both) == 2
    assert cli.main(_args(eval_set, out)) == 2  # neither
    assert cli.main(_args(eval_set, out, "--model", str(tiny_model_dir), "--chat")) == 2
    assert "exactly one of --model" in capsys.readouterr().err
    # a wrong key: one line naming the server, no traceback; the answers file keeps only its _meta
    assert cli.main(_args(eval_set, out, "--api-url", served + "/v1", "--api-key", "sk-wrong",
                          "--served-model", tiny_model_dir.name)) == 2
    err = capsys.readouterr().err
    assert served in err and "Traceback" not in err
