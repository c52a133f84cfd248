"""Property-based fuzzing of `toucan serve` with schemathesis, from the app's own OpenAPI schema,
against a real server process with an API key (issue 11). Any 5xx is a failure. Both valid
requests (positive) and schema-violating ones (negative: wrong types, missing fields, bad
content types) are sent; the run is derandomized so CI is deterministic."""

import collections

import pytest

from conftest import free_port
from test_api import start_server
from test_engine import save_parrot

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
PER_STRATEGY = 300  # examples per (operation, positive/negative): over 1,000 requests in all


def test_schemathesis_finds_no_server_error(tiny_tok, tmp_path):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    model = save_parrot(tiny_tok, tmp_path / "parrot")
    # two new tokens at most per request (--max-tokens-limit), so generation stays cheap
    proc, base = start_server(["--model", str(model), "--api-key", KEY, "--max-tokens", "2",
                               "--max-tokens-limit", "2", "--batch-wait-ms", "1"], free_port(), tmp_path / "server.log")
    try:
        schema = schemathesis.openapi.from_url(base + "/openapi.json", headers=AUTH)
        operations = [r.ok() for r in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}
        ran, statuses, server_errors = collections.Counter(), collections.Counter(), []
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                if mode == GenerationMode.NEGATIVE and op.method.upper() == "GET":
                    continue  # no parameters: nothing to violate

                @settings(max_examples=PER_STRATEGY, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
                @given(case=op.as_strategy(generation_mode=mode))
                def send(case):
                    if mode == GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
                        case.body["model"] = "parrot"  # this server's one model: past the 404, into generation
                    response = case.call(base_url=base, headers=AUTH, timeout=120)
                    ran[f"{op.method.upper()} {op.path} {mode.value}"] += 1
                    statuses[response.status_code] += 1
                    if response.status_code >= 500:
                        server_errors.append(f"{response.status_code} {response.text[:300]}\n{case.as_curl_command()}")

                send()
        total = sum(ran.values())
        print(f"\nschemathesis: {total} cases, {len(server_errors)} server errors; statuses {dict(statuses)}")
        for k, v in sorted(ran.items()):
            print(f"  {k}: {v}")
        assert not server_errors, "\n\n".join(server_errors[:5])
        assert total >= 1000 and statuses[200] > 100  # real generations among them, not only refusals
        assert "Traceback" not in open(tmp_path / "server.log").read()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
