"""A scripted OpenAI-compatible judge for the eval tests and the acceptance run: a real HTTP server
(FastAPI + uvicorn on 127.0.0.1) that answers /v1/chat/completions deterministically from the
message text, and counts every message it receives and every message it answers.

    python tests/eval_judge_server.py --port 8123

Control (JSON to POST /admin/config): {"budget": N} answers N messages, then holds every further
request open without answering (until the budget is raised or the client goes away), so a test can
SIGKILL the judge at a known point; {"fail_first": K, "fail_status": 429} makes the next K tries of
each message fail with that status; {"bad_reply": MODE, "bad_first": K, "bad_share": 0.5} answers the
first K tries of a share of the messages (chosen by their hash) with a malformed 200 reply, MODE
one of BAD_REPLIES (K large: always). GET /admin/counts returns the counts per message hash.
"""

import argparse
import asyncio
import hashlib
from collections import Counter

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

# Reply forms seen from real judges: {s} is the score as a decimal, {t} in tenths (0..10).
FORMS = [
    "得分：{s}\n理由：模型回答基本正确。",
    "得分: {s}",
    "**得分**: {s}分\n\n理由：回答与标准答案接近。",
    "得分:{s}/1。理由：……",
    "理由：回答不完整，缺少关键步骤。\n最终得分为 {s}",
    "得分：{t}/10，理由：部分正确。",
    "得分：{t}",                                   # out of 0..1 unless t is 0 or 1: rejected
    "模型回答与标准答案不一致，无法给出得分。",       # no score at all
]


def reply_for(message: str) -> tuple[str, float | None]:
    """(reply text, the score a correct parser must read from it, None = no valid score)."""
    h = int(hashlib.sha256(message.encode("utf-8")).hexdigest(), 16)
    k, tenth = h % len(FORMS), (h >> 8) % 11
    text = FORMS[k].format(s=f"{tenth / 10:g}", t=tenth)
    if "{" not in FORMS[k]:
        return text, None
    if FORMS[k] == "得分：{t}":
        return text, (float(tenth) if tenth <= 1 else None)
    return text, tenth / 10


# Malformed replies a broken proxy, a captive portal or a buggy server send with status 200.
BAD_REPLIES = {
    "html": ("<html><body><h1>Service temporarily unavailable</h1></body></html>", "text/html"),
    "broken_json": ('{"id": "cmpl-1", "choices": [{"message": {"content": "得分', "application/json"),
    "empty_object": ("{}", "application/json"),
    "no_choices": ('{"id": "cmpl-1", "object": "chat.completion", "created": 0, "model": "m", "choices": []}',
                   "application/json"),
    "not_object": ('["choices"]', "application/json"),
    "no_message": ('{"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": '
                   '[{"index": 0, "finish_reason": "stop", "message": null}]}', "application/json"),
    "content_number": ('{"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": '
                       '[{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": 7}}]}',
                       "application/json"),
}


def in_share(key: str, share: float) -> bool:
    """Whether a message (by its sha256 hex) is in the `share` of messages that get bad replies."""
    return int(key[:8], 16) / 0xFFFFFFFF < share


def make_app():
    app = FastAPI()
    state = {"budget": None, "fail_first": 0, "fail_status": 500, "bad_reply": None, "bad_first": 0,
             "bad_share": 1.0}
    received: Counter = Counter()
    answered: Counter = Counter()
    gone: Counter = Counter()  # held requests whose client went away (never answered)
    failed: Counter = Counter()  # scripted failures per message since the last /admin/config

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "scripted-judge", "object": "model", "owned_by": "tests"}]}

    @app.post("/admin/config")
    async def config(request: Request):
        state.update(await request.json())
        failed.clear()
        return state

    @app.get("/admin/counts")
    async def counts():
        return {"received": dict(received), "answered": dict(answered), "gone": dict(gone),
                "total_received": sum(received.values()), "total_answered": sum(answered.values())}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        message = body["messages"][-1]["content"]
        key = hashlib.sha256(message.encode("utf-8")).hexdigest()
        received[key] += 1
        if failed[key] < state["fail_first"]:
            failed[key] += 1
            return JSONResponse({"error": {"message": "scripted failure", "type": "server_error"}},
                                status_code=state["fail_status"])
        if state["bad_reply"] and in_share(key, state["bad_share"]) and failed[key] < state["bad_first"]:
            failed[key] += 1
            body, media_type = BAD_REPLIES[state["bad_reply"]]
            return Response(body, status_code=200, media_type=media_type)
        while state["budget"] is not None and sum(answered.values()) >= state["budget"]:
            if await request.is_disconnected():
                gone[key] += 1
                return JSONResponse({"error": {"message": "client gone"}}, status_code=499)
            await asyncio.sleep(0.05)
        text, _ = reply_for(message)
        answered[key] += 1
        return {"id": f"cmpl-{key[:12]}", "object": "chat.completion", "created": 0, "model": body.get("model"),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": len(message), "completion_tokens": len(text),
                          "total_tokens": len(message) + len(text)}}

    return app


if __name__ == "__main__":
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    uvicorn.run(make_app(), host="127.0.0.1", port=args.port, log_level="warning")
