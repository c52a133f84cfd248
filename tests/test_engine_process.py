"""The engine in its own process (toucan.serve.engine_process, what `toucan serve` runs): the same
answers as in-process generation, streaming, cancellation across the pipe, requests joining the
child's running batch, a child that dies, and a bad model directory. Real spawned processes."""

import threading
import time

import pytest

from toucan.engine import Cancel, Engine
from toucan.errors import ToucanError
from toucan.sampling import SamplingParams
from toucan.serve.engine_process import EngineProcess

GREEDY = dict(temperature=0.0, repetition_penalty=1.0)
PROMPTS = ["你好", "请写一首诗。", "第二个问题"]


@pytest.fixture(scope="module")
def proc(tiny_model_dir):
    e = EngineProcess(tiny_model_dir, max_rows=4, device="cpu", threads=1)
    yield e
    e.close()


def test_answers_equal_in_process_generation(proc, tiny_model_dir):
    local = Engine.from_dir(tiny_model_dir, device="cpu")
    opts = SamplingParams(max_new_tokens=24, **GREEDY)
    assert proc.max_context == local.max_context
    assert [c.text for c in proc.generate_batch(PROMPTS, opts)] == [c.text for c in local.generate_batch(PROMPTS, opts)]
    seeded = SamplingParams(max_new_tokens=16, temperature=0.9, seed=7)  # a seeded row draws from its own generator
    assert proc.generate("你好", seeded).text == local.generate("你好", seeded).text
    s = proc.stream("请写一首诗。", SamplingParams(max_new_tokens=20, stop=["。"], **GREEDY))
    assert "".join(s) == s.completion.text == local.generate("请写一首诗。", SamplingParams(
        max_new_tokens=20, stop=["。"], **GREEDY)).text


def test_cancel_reaches_the_child(proc):
    s = proc.stream("你好", SamplingParams(max_new_tokens=400, min_new_tokens=400, **GREEDY))
    it = iter(s)
    next(it)
    s.cancel()
    list(it)
    assert s.completion.finish_reason == "cancelled" and s.completion.completion_tokens < 100


def test_request_joins_the_childs_running_batch(proc):
    first, ends = {}, {}

    def run(name, opts):
        s = proc.stream(name, opts)
        for _ in s:
            first.setdefault(name, time.monotonic())
        ends[name] = (time.monotonic(), s.completion)

    before = proc.batch_stats().get("joined", 0)
    long = threading.Thread(target=run, args=("你好", SamplingParams(max_new_tokens=300, min_new_tokens=300, **GREEDY)))
    long.start()
    while "你好" not in first:
        time.sleep(0.005)
    short = threading.Thread(target=run, args=("第二个问题", SamplingParams(max_new_tokens=8, min_new_tokens=8, **GREEDY)))
    short.start()
    long.join(120), short.join(120)
    assert first["第二个问题"] < ends["你好"][0]  # its first token came while the long one ran
    assert ends["你好"][1].completion_tokens == 300 and ends["第二个问题"][1].completion_tokens == 8
    assert proc.batch_stats()["joined"] == before + 2 and proc.queued() == 0


def test_a_dead_child_fails_requests_instead_of_hanging(tiny_model_dir):
    e = EngineProcess(tiny_model_dir, max_rows=2, device="cpu", threads=1)
    got, started = [], threading.Event()
    e.submit(e.encode("你好"), SamplingParams(max_new_tokens=2000, min_new_tokens=2000, **GREEDY),
             on_done=got.append, on_text=lambda t: started.set(), cancel=Cancel())
    assert started.wait(60)
    e._proc.kill()
    e._proc.join(10)
    deadline = time.monotonic() + 30
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(got) == 1 and isinstance(got[0], RuntimeError)  # the one in flight
    later = []
    e.submit(e.encode("你好"), SamplingParams(max_new_tokens=4), on_done=later.append)
    assert len(later) == 1 and isinstance(later[0], RuntimeError)  # and every one after, at once
    e.close()


def test_a_directory_without_a_model_is_one_clear_error(tmp_path, tiny_model_dir):
    import shutil

    d = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, d)
    for f in d.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ToucanError) as e:
        EngineProcess(d, device="cpu")
    assert "\n" not in str(e.value) and str(d) in str(e.value)


@pytest.mark.parametrize("how", ["terminate", "kill"])
def test_the_engine_process_ends_with_the_server(tiny_model_dir, tmp_path, how):
    """`toucan serve` stopped (SIGTERM: uvicorn's shutdown closes the pipe) or killed outright
    (SIGKILL: the child reads EOF) leaves no engine process behind."""
    import psutil

    from conftest import free_port
    from test_api import start_server

    proc, _ = start_server(["--model", str(tiny_model_dir), "--api-key", "sk-test", "--threads", "1"], free_port(),
                           tmp_path / "server.log")
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "the continuous engine runs in a child process"
    getattr(proc, how)()
    proc.wait(30)
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, (alive, (tmp_path / "server.log").read_text()[-2000:])
