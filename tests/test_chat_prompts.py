"""The same question gives the same prompt bytes (and token ids) in training, `toucan chat`,
`toucan web` and `toucan serve`: each front end's own prompt function against toucan.data's."""

import pytest

from toucan.data import Record, encode_example, record_prompt
from toucan.engine import Engine
from toucan.modeling import tiny_llama
from toucan.serve.api import ChatRequest, request_prompt
from toucan.serve.web import web_prompt

Q = "把这句话翻译成英文：鳕鱼很好吃。"
HISTORY = [("你好", "你好！有什么可以帮你？"), ("1+1=?", "2")]


@pytest.fixture(scope="module")
def engine(tiny_tok):
    return Engine(tiny_llama(len(tiny_tok), tokenizer=tiny_tok), tiny_tok)


@pytest.mark.parametrize("history", [[], HISTORY])
def test_same_prompt_bytes_everywhere(engine, tiny_tok, history):
    rec = Record(instruction=Q, output="Cod is tasty.", history=list(history))
    train = record_prompt(rec)
    # toucan chat: serve.chat.answer builds its prompt with engine.chat_prompt
    chat = engine.chat_prompt(history, Q, 64)[0]
    # toucan web: the Chatbot's messages (Gradio 6 content parts) -> web_prompt
    gr_msgs = []
    for q, a in history:
        gr_msgs += [{"role": "user", "content": [{"type": "text", "text": q}]},
                    {"role": "assistant", "content": [{"type": "text", "text": a}]}]
    web = web_prompt(engine, gr_msgs, Q, 64)
    # toucan serve: an OpenAI chat request
    msgs = []
    for q, a in history:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    req = ChatRequest(model="m", messages=msgs + [{"role": "user", "content": Q}])
    serve = request_prompt(engine, req, 64)
    assert train.encode() == chat.encode() == web.encode() == serve.encode()
    # and the ids the engine feeds the model are the training example's prompt part
    enc = encode_example(tiny_tok, train, rec.output, 512)
    n_prompt = enc.labels.index(next(x for x in enc.labels if x != -100))
    assert engine.encode(serve) == enc.input_ids[:n_prompt]
