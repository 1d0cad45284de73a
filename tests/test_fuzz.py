"""Fuzzes the HTTP API from its own OpenAPI document with schemathesis: every operation that
/openapi.json of a real gateway process lists gets generated requests, valid ones and ones that break
the schema, and no answer may be a 5xx, hang (CALL_TIMEOUT_S), or break the documented status codes,
content types and response schemas. Operations on one job are also fuzzed with the id of a real finished job,
so their success answers are checked too, not only their 404s.

A nats-server, a gateway and a worker on the simulated engine (no time per step: jobs cost nothing)
run as real processes of this module's own. Examples per operation are few and derandomized, so a
run is bounded and repeatable.
"""

from __future__ import annotations

import aiohttp
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode

from gateway.http.openapi import OPERATIONS
from tests.helpers.real_processes import own_stack, submit, wait_state

pytestmark = pytest.mark.processes  # each test starts imagegen or nats-server processes of its own

LIMIT_FLAGS = ("--max-pixels", str(1024 * 1024), "--max-steps", "50")
CALL_TIMEOUT_S = 15.0  # a hang fails its example instead of stalling the run
POSITIVE, NEGATIVE, KNOWN = "positive", "negative", "known-job"
EXAMPLES = {POSITIVE: 40, NEGATIVE: 30, KNOWN: 15}

CONFIG = f"""
request-timeout = {CALL_TIMEOUT_S}
[phases.coverage]
enabled = false
[phases.stateful]
enabled = false
"""

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
async def fuzzed_gateway(tmp_path_factory):
    """A nats-server, a simulated worker and a gateway, of this module's own, as real processes."""
    worker_flags = (*LIMIT_FLAGS, "--sim-step-s", "0", "--preview-every", "0")
    async with own_stack(tmp_path_factory.mktemp("fuzz"), name="fuzz", worker_flags=worker_flags, gateway_flags=LIMIT_FLAGS) as parts:
        url, _, gateway, _ = parts
        yield url, gateway


@pytest.fixture(scope="module")
def api_schema(fuzzed_gateway):
    url, _ = fuzzed_gateway
    return schemathesis.openapi.from_url(f"{url}/openapi.json", config=schemathesis.Config.from_str(CONFIG))


@pytest.fixture
async def finished_job(fuzzed_gateway) -> str:
    url, _ = fuzzed_gateway
    async with aiohttp.ClientSession() as http:
        job_id = await submit(http, url, {"prompt": "a fuzzed lighthouse", "width": 64, "height": 64, "steps": 2})
        assert (await wait_state(http, url, job_id, {"done", "failed"}))["state"] == "done"
    return job_id


def test_the_served_document_lists_every_operation(api_schema):
    served = {(op.ok().method.lower(), op.ok().path) for op in api_schema.get_all_operations()}
    assert served == {(method, path) for method, path, *_ in OPERATIONS}


def id_parameter(params: list[dict]) -> tuple[str, str] | None:
    """Where an operation on one job takes the job's id: ("path", "job_id") or ("query", "task_id")."""
    for param in params:
        if param["name"] in ("job_id", "task_id"):
            return param["in"], param["name"]
    return None


ID_PARAMETERS = {(method, path): id_parameter(params) for method, path, _summary, _tag, _body, _answer, params, *_ in OPERATIONS}


def fuzz_runs() -> list:
    """Every operation with valid input; with input that breaks the schema where there is a body or a
    query to break (a string path parameter takes any string); with a real job's id where it takes one."""
    runs = []
    for method, path, _summary, _tag, body, _answer, params, *_ in OPERATIONS:
        modes = [POSITIVE]
        if body is not None or any(p["in"] == "query" for p in params):
            modes.append(NEGATIVE)
        if ID_PARAMETERS[method, path]:
            modes.append(KNOWN)
        runs += [pytest.param(method, path, mode, id=f"{method.upper()} {path} {mode}") for mode in modes]
    return runs


def call_and_check(case, gateway) -> None:
    response = case.call(timeout=CALL_TIMEOUT_S)
    where = f"{case.method} {case.formatted_path} ({case.as_curl_command()})"
    try:
        case.validate_response(response, checks=CHECKS)
    except AssertionError as failure:  # schemathesis' failures are AssertionErrors: add what the gateway logged
        raise AssertionError(f"{failure}\n{where}\ngateway log:\n{gateway.log()[-4000:]}") from None
    assert gateway.alive, f"the gateway died on {where}:\n{gateway.log()[-3000:]}"


def strategy_for(operation, method: str, mode: str, job_id: str):
    if mode == NEGATIVE:
        return operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)
    if mode == KNOWN:
        where, name = ID_PARAMETERS[method, operation.path]
        fixed = {"path_parameters" if where == "path" else "query": {name: job_id}}
        return operation.as_strategy(generation_mode=GenerationMode.POSITIVE, **fixed)
    return operation.as_strategy(generation_mode=GenerationMode.POSITIVE)


@pytest.mark.parametrize("method, path, mode", fuzz_runs())
def test_operation_never_answers_5xx_or_hangs(request, api_schema, fuzzed_gateway, method, path, mode):
    _, gateway = fuzzed_gateway
    operation = api_schema[path][method.upper()]
    job_id = request.getfixturevalue("finished_job") if mode == KNOWN else ""

    @hypothesis.given(case=strategy_for(operation, method, mode, job_id))
    @hypothesis.settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case):
        call_and_check(case, gateway)

    fuzz()
