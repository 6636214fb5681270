"""The OpenAI-compatible HTTP API, driven by the official `openai` client against a real
loopback server sharing the demo engine with gRPC: completions and chat, streamed and
not, token for token equal to the gRPC path; logprobs; stop strings; OpenAI-shaped
errors (400/401/404/413/429/503); a disconnect mid-stream freeing its pages; the
`vllm:` metrics while requests run."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import shutil
import threading
import urllib.error
import urllib.request

import openai
import pytest

from meshserve.models.checkpoint import checkpoint_config
from meshserve.models.tokenizer import Tokenizer
from tests.serving_fixtures import (  # noqa: F401
    demo_ckpt,
    demo_model,
    free_port,
    request,
    running_server,
    stub_for,
    tokens_of,
    wait_idle,
)

MAX_REQUEST_BYTES = 8192
TOKEN = "http-s3cret-0123456789"
# A chat template for the demo tokenizer (which has none): the shared compiled engine
# serves chats without a second model.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
            "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = ["The color of the mesh is", "Hello mesh, how are"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello mesh"}]


@pytest.fixture(scope="module")
def chat_model(demo_model, tmp_path_factory):  # noqa: F811
    """The demo model (same slices, same compiled engine) with a chat template."""
    folder = tmp_path_factory.mktemp("demo-chat")
    source = demo_model.tokenizer.path
    shutil.copy(source, folder / os.path.basename(source))
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    config = checkpoint_config(os.path.dirname(source))
    tokenizer = Tokenizer(str(folder / os.path.basename(source)), config)
    assert tokenizer.can_chat
    return dataclasses.replace(demo_model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def server(chat_model):
    with running_server(chat_model, http_port=0, metrics_port=free_port(),
                        max_request_bytes=MAX_REQUEST_BYTES) as s:
        s.base = f"http://127.0.0.1:{s.server.http_port}"
        yield s


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    channel, stub = stub_for(server.target)
    yield stub
    channel.close()


def _model(server) -> str:
    return server.server.model_name


def _grpc(stub, **fields):
    responses = list(stub.Generate(request(**fields)))
    return tokens_of(responses), "".join(r.text for r in responses), responses[-1]


def _extra(obj, name):
    return obj.model_dump()[name]


def _scrape(url: str, token: str | None = None) -> dict[str, float]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token
                                 else {})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z0-9_:]+(?:\{[^}]*\})?) ([0-9.e+-]+|NaN)", line)
        if m:
            samples[m.group(1)] = float(m.group(2))
    return samples


def _post(url: str, data: bytes, headers=None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_completions_equal_grpc_token_for_token(server, client, stub, chat_model):
    model = _model(server)
    for prompt in PROMPTS:
        ids, text, last = _grpc(stub, prompt=prompt, max_tokens=12, ignore_eos=True)
        r = client.completions.create(model=model, prompt=prompt, max_tokens=12,
                                      temperature=0, extra_body={"ignore_eos": True,
                                                                 "return_token_ids": True})
        choice = r.choices[0]
        assert _extra(choice, "token_ids") == ids and choice.text == text
        assert choice.finish_reason == "length" and r.object == "text_completion"
        assert r.model == model and r.id.startswith("cmpl-")
        assert r.usage.prompt_tokens == last.usage.prompt_tokens
        assert r.usage.completion_tokens == 12
        assert r.usage.total_tokens == 12 + r.usage.prompt_tokens
        # Streamed: the same text in pieces, the finish reason on the last choice.
        pieces = list(client.completions.create(
            model=model, prompt=prompt, max_tokens=12, stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True}))
        assert "".join(p.choices[0].text for p in pieces) == text
        assert [t for p in pieces for t in _extra(p.choices[0], "token_ids")] == ids
        assert pieces[-1].choices[0].finish_reason == "length"
        assert all(p.choices[0].finish_reason is None for p in pieces[:-1])
    # Token ids as the prompt, with the usage chunk last.
    ids, text, _ = _grpc(stub, token_ids=[1, 40, 41, 42], max_tokens=6, ignore_eos=True)
    chunks = list(client.completions.create(
        model=model, prompt=[1, 40, 41, 42], max_tokens=6, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == text
    # Unset max_tokens is OpenAI's 16 for completions.
    r = client.completions.create(model=model, prompt="Hello", extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16
    wait_idle(chat_model.slices[0].engine)


def test_sse_framing_and_unknown_fields(server):
    body = json.dumps({"prompt": [1, 5, 6], "max_tokens": 5, "stream": True, "ignore_eos": True,
                       "some_vendor_field": {"x": 1}}).encode()
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    log = logging.getLogger("meshserve.serving")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        req = urllib.request.Request(server.base + "/v1/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            events = [e for e in r.read().decode().split("\n\n") if e]
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    ignored = [r for r in seen if r.getMessage() == "unknown_fields_ignored"]
    assert ignored and ignored[0].fields["fields"] == ["some_vendor_field"]


def test_logprobs_present_and_consistent(server, client, stub):
    model = _model(server)
    ids, _, _ = _grpc(stub, token_ids=[1, 40, 41, 42], max_tokens=6, ignore_eos=True,
                      logprobs=3)
    grpc_lps = [lp for r in stub.Generate(request(token_ids=[1, 40, 41, 42], max_tokens=6,
                                                  ignore_eos=True, logprobs=3))
                for lp in r.logprobs]
    r = client.completions.create(model=model, prompt=[1, 40, 41, 42], max_tokens=6,
                                  logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert lp.token_logprobs == pytest.approx([x.logprob for x in grpc_lps], abs=1e-5)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and 1 <= len(top) <= 3
        assert top[token] == pytest.approx(value, abs=1e-5)  # greedy: the best is chosen
        assert max(top.values()) == pytest.approx(value, abs=1e-5)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # Chat: logprobs + top_logprobs, streamed.
    pieces = list(client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=5, logprobs=True, top_logprobs=2, stream=True,
        extra_body={"ignore_eos": True}))
    content = [c for p in pieces if p.choices and p.choices[0].logprobs
               for c in p.choices[0].logprobs.content]
    assert len(content) == 5
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 2
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5)
        assert c.bytes == list(c.token.encode())
    plain = client.completions.create(model=model, prompt=[1, 40, 41, 42], max_tokens=6,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
    assert plain.choices[0].logprobs is None and _extra(plain.choices[0], "token_ids") == ids


def test_stop_strings_and_stop_token_ids(server, client, stub, chat_model):
    model = _model(server)
    full_ids, text, _ = _grpc(stub, token_ids=[1, 50, 60, 70], max_tokens=12, ignore_eos=True)
    needle = text.strip()[len(text.strip()) // 2:][:3]
    assert needle.strip()
    _, grpc_text, grpc_last = _grpc(stub, token_ids=[1, 50, 60, 70], max_tokens=12,
                                    ignore_eos=True, stop=[needle])
    r = client.completions.create(model=model, prompt=[1, 50, 60, 70], max_tokens=12,
                                  stop=[needle, "never-there"], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" == grpc_last.finish_reason
    assert r.choices[0].text == grpc_text and needle not in r.choices[0].text
    one = client.completions.create(model=model, prompt=[1, 50, 60, 70], max_tokens=12,
                                    stop=needle, extra_body={"ignore_eos": True})
    assert one.choices[0].text == grpc_text
    by_id = client.completions.create(model=model, prompt=[1, 50, 60, 70], max_tokens=12,
                                      extra_body={"ignore_eos": True, "return_token_ids": True,
                                                  "stop_token_ids": [full_ids[3]]})
    assert _extra(by_id.choices[0], "token_ids") == full_ids[:full_ids.index(full_ids[3]) + 1]
    assert by_id.choices[0].finish_reason == "stop"
    wait_idle(chat_model.slices[0].engine)


def test_chat_equals_grpc_messages(server, client, stub, chat_model):
    model = _model(server)
    ids, text, last = _grpc(stub, messages=[(m["role"], m["content"]) for m in CHAT],
                            max_tokens=10, ignore_eos=True)
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=10,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert _extra(choice, "token_ids") == ids and choice.finish_reason == "length"
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.usage.prompt_tokens == last.usage.prompt_tokens
    # The same prompt just ran over gRPC: its full pages (never the last token) are
    # served from the prefix cache, and the usage says so.
    page = chat_model.slices[0].engine.config.page_size
    full_pages = (r.usage.prompt_tokens - 1) // page * page
    assert r.usage.prompt_tokens_details.cached_tokens == full_pages > 0
    # max_completion_tokens and text parts; streamed deltas with the role first.
    parts = [CHAT[0], {"role": "user", "content": [{"type": "text", "text": "Hello mesh"}]}]
    pieces = list(client.chat.completions.create(
        model=model, messages=parts, max_completion_tokens=10, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert pieces[0].choices[0].delta.role == "assistant"
    assert all(p.choices[0].delta.role is None for p in pieces[1:-1])
    assert "".join(p.choices[0].delta.content or "" for p in pieces[:-1]) == text
    assert pieces[-2].choices[0].finish_reason == "length"
    assert pieces[-1].usage.completion_tokens == 10 and pieces[-1].object == "chat.completion.chunk"


def _bad(client, model, chat=False, **fields):
    create = client.chat.completions.create if chat else client.completions.create
    base = dict(model=model, messages=CHAT) if chat else dict(model=model, prompt=[1, 5, 6])
    extra = {k: fields.pop(k) for k in list(fields) if k not in (
        "prompt", "messages", "max_tokens", "temperature", "n", "echo", "best_of", "logit_bias",
        "stop", "logprobs", "top_logprobs", "tools", "stream_options", "top_p")}
    with pytest.raises(openai.APIStatusError) as info:
        create(**{**base, **fields}, extra_body=extra or None)
    return info.value


BAD = [  # (chat, fields, param, message fragment)
    (False, dict(temperature=-1), "temperature", "temperature must be >= 0"),
    (False, dict(temperature="hot"), "temperature", "temperature must be a number"),
    (False, dict(top_p=0), "top_p", "top_p must be in (0, 1]"),
    (False, dict(n=2), "n", "n=2 is not supported"),
    (False, dict(echo=True), "echo", "echo=true is not supported"),
    (False, dict(best_of=3), "best_of", "best_of=3 is not supported"),
    (False, dict(logit_bias={"5": 1}), "logit_bias", "logit_bias is not implemented"),
    (False, dict(min_tokens=4), "min_tokens", "min_tokens is not implemented"),
    (False, dict(prompt=[[1, 2], [3, 4]]), "prompt", "one prompt per request"),
    (False, dict(prompt=[1, 600]), "prompt", "outside the vocabulary [0, 512)"),
    (False, dict(prompt=""), "prompt", "prompt is empty"),
    (False, dict(max_tokens=300), "max_tokens", "exceeds the model length 256"),
    (False, dict(stop=5), "stop", "stop must be a string or a list of strings"),
    (False, dict(logprobs=9), "logprobs", "logprobs must be in [0, 4]"),
    (False, dict(stream_options={"include_usage": True}), "stream_options", "needs stream"),
    (True, dict(messages=[]), "messages", "messages must be a non-empty list"),
    (True, dict(messages=[{"role": "robot", "content": "hi"}]), None, "role 'robot'"),
    (True, dict(top_logprobs=2), "top_logprobs", "needs logprobs=true"),
    (True, dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools",
     "tool calling is not implemented"),
    (True, dict(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "messages",
     "only text parts are supported"),
]


def test_bad_input_is_a_400_in_openai_s_shape(server, client, chat_model):
    model = _model(server)
    registry = server.server.metrics.registry
    before = registry.get_sample_value("meshserve_requests_rejected_total", {"reason": "invalid"})
    for chat, fields, param, message in BAD:
        e = _bad(client, model, chat, **dict(fields))
        assert e.status_code == 400, (fields, e.body)
        assert e.type == "invalid_request_error" and message in e.message, (fields, e.message)
        if param is not None:
            assert e.param == param, (fields, e.body)
        assert set(e.body) == {"message", "type", "param", "code"}
    after = registry.get_sample_value("meshserve_requests_rejected_total", {"reason": "invalid"})
    assert after - before == len(BAD)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="not-this-one", prompt="Hi", max_tokens=2)
    assert info.value.param == "model" and info.value.code == "model_not_found"
    status, body = _post(server.base + "/v1/completions", b'{"prompt": [1, 2,')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _post(server.base + "/v1/completions", b"[1, 2]")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = _post(server.base + "/v1/completions", json.dumps(
        {"prompt": "a" * MAX_REQUEST_BYTES}).encode())
    assert status == 413 and "--max-request-bytes" in body["error"]["message"]
    status, body = _post(server.base + "/v1/nothing", b"{}")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    # The server carries on.
    ok = client.completions.create(model=model, prompt=[1, 5, 6], max_tokens=3,
                                   extra_body={"ignore_eos": True})
    assert ok.usage.completion_tokens == 3
    wait_idle(chat_model.slices[0].engine)


def test_models_health_and_metrics_while_requests_run(server, client, chat_model):
    model = _model(server)
    listed = client.models.list().data
    assert [m.id for m in listed] == [model] and _extra(listed[0], "max_model_len") == 256
    with urllib.request.urlopen(server.base + "/health", timeout=10) as r:
        assert r.status == 200
    engine = chat_model.slices[0].engine
    labels = f'{{engine="0",model_name="{model}"}}'
    before = _scrape(server.base + "/metrics")
    stream = client.completions.create(model=model, prompt=[1, 9, 10, 11], max_tokens=200,
                                       stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    for _ in range(3):
        next(it)
    running = _scrape(server.base + "/metrics")
    assert running[f"vllm:num_requests_running{labels}"] == 1
    assert running[f"vllm:num_requests_waiting{labels}"] == 0
    assert 0 < running[f"vllm:kv_cache_usage_perc{labels}"] < 1
    info = [k for k in running if k.startswith("vllm:cache_config_info")]
    assert info and 'block_size="16"' in info[0] and 'num_gpu_blocks="64"' in info[0]
    gen = f"vllm:generation_tokens_total{labels}"
    prompt = f"vllm:prompt_tokens_total{labels}"
    assert running[gen] > before[gen] and running[prompt] == before[prompt] + 4
    ttft = f"vllm:time_to_first_token_seconds_count{labels}"
    assert running[ttft] == before[ttft] + 1
    rest = list(it)
    assert rest[-1].choices[0].finish_reason == "length"
    after = _scrape(server.base + "/metrics")
    assert after[f"vllm:num_requests_running{labels}"] == 0
    assert after[gen] == before[gen] + 200
    e2e = f"vllm:e2e_request_latency_seconds_count{labels}"
    assert after[e2e] == before[e2e] + 1
    itl = f"vllm:inter_token_latency_seconds_count{labels}"
    assert after[itl] - before[itl] == 199  # one per token after the first
    tpot = 'meshserve_time_per_output_token_seconds_count{slice="0"}'
    assert after[tpot] == before[tpot] + 1
    s = after[f"vllm:e2e_request_latency_seconds_sum{labels}"] - before[
        f"vllm:e2e_request_latency_seconds_sum{labels}"]
    assert 0 < s < 120
    # Host time of the steps that ran, by phase.
    for phase in ("schedule", "transfer", "dispatch", "device_wait", "results"):
        key = f'meshserve_step_host_seconds_count{{phase="{phase}",slice="0"}}'
        assert after[key] > before[key], phase
    waited = 'meshserve_step_host_seconds_sum{phase="device_wait",slice="0"}'
    assert 0 < after[waited] - before[waited] < s
    # The same registry on --metrics-port.
    port_samples = _scrape(f"http://127.0.0.1:{server.server.options.metrics_port}/metrics")
    assert port_samples[gen] == after[gen]
    wait_idle(engine)


def test_disconnect_mid_stream_frees_its_pages(server, client, chat_model):
    engine = chat_model.slices[0].engine
    registry = server.server.metrics.registry
    labels = {"slice": "0", "reason": "cancelled"}
    before = registry.get_sample_value("meshserve_requests_finished_total", labels) or 0
    stream = client.completions.create(model=_model(server), prompt=[1, 20, 21, 22],
                                       max_tokens=240, stream=True,
                                       extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices[0].text is not None
    assert engine.stats().free_pages < engine.stats().total_pages
    stream.close()  # drops the connection
    wait_idle(engine, timeout=5.0)
    assert registry.get_sample_value("meshserve_requests_finished_total", labels) == before + 1
    assert engine.stats().running == 0


def test_queue_full_is_429(server, client, chat_model):
    """30 requests of 200 prompt tokens at once: 4 fit in the 64 KV pages and the
    2048-token waiting limit holds 10 more; the rest get 429 at once."""
    model = _model(server)

    def one(i: int):
        try:
            r = client.completions.create(model=model, prompt=[1] + [10 + i] * 199,
                                          max_tokens=4, extra_body={"ignore_eos": True})
            return r.usage.completion_tokens
        except openai.APIStatusError as e:
            return e

    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        results = list(pool.map(one, range(30)))
    errors = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert errors, "no request was refused"
    assert all(isinstance(e, openai.RateLimitError) for e in errors)
    assert all("waiting prompts would hold" in e.message and e.code == "overloaded"
               for e in errors)
    assert [r for r in results if not isinstance(r, openai.APIStatusError)] == [4] * (
        30 - len(errors))
    wait_idle(chat_model.slices[0].engine)


def test_bearer_token_and_draining_503(chat_model):
    with running_server(chat_model, http_port=0, auth_token=TOKEN.encode()) as s:
        base = f"http://127.0.0.1:{s.server.http_port}"
        for key in ("wrong", TOKEN + "x", TOKEN[:-1]):
            with openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0) as c:
                with pytest.raises(openai.AuthenticationError) as info:
                    c.completions.create(model="m", prompt=[1, 5], max_tokens=2)
                assert info.value.code == "unauthenticated"
                with pytest.raises(openai.AuthenticationError):
                    c.models.list()
        with pytest.raises(urllib.error.HTTPError) as info:
            _scrape(base + "/metrics")
        assert info.value.code == 401
        assert "vllm:num_requests_running" in str(_scrape(base + "/metrics", TOKEN))
        with urllib.request.urlopen(base + "/health", timeout=10) as r:  # probes: no token
            assert r.status == 200
        status, _ = _post(base + "/start_profile", b"", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 404  # profiling is off without --profile-dir
        with openai.OpenAI(base_url=base + "/v1", api_key=TOKEN, max_retries=0) as c:
            r = c.completions.create(model=s.server.model_name, prompt=[1, 5, 6], max_tokens=3,
                                     extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == 3
            # A long stream in flight when draining starts: it finishes, new work gets 503.
            stream = c.completions.create(model=s.server.model_name, prompt=[1, 7, 8],
                                          max_tokens=60, stream=True,
                                          extra_body={"ignore_eos": True})
            it = iter(stream)
            next(it)
            s.call(s.server.drain())
            with pytest.raises(openai.InternalServerError) as info:
                c.completions.create(model=s.server.model_name, prompt=[1, 5], max_tokens=2)
            assert info.value.status_code == 503 and info.value.code == "draining"
            assert "shutting down" in info.value.message
            with pytest.raises(urllib.error.HTTPError) as health:
                urllib.request.urlopen(base + "/health", timeout=10)
            assert health.value.code == 503
            assert list(it)[-1].choices[0].finish_reason == "length"
    wait_idle(chat_model.slices[0].engine)


def test_concurrent_clients_each_get_their_own_output(server, stub, chat_model):
    model = _model(server)
    prompts = [[1, 100 + i, 200 + i] for i in range(12)]
    expected = [_grpc(stub, token_ids=p, max_tokens=8, ignore_eos=True)[0] for p in prompts]
    results: dict[int, list[int]] = {}

    def one(i: int) -> None:
        with openai.OpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0) as c:
            pieces = c.completions.create(model=model, prompt=prompts[i], max_tokens=8,
                                          stream=i % 2 == 0,
                                          extra_body={"ignore_eos": True,
                                                      "return_token_ids": True})
            if i % 2 == 0:
                results[i] = [t for p in pieces for t in _extra(p.choices[0], "token_ids")]
            else:
                results[i] = _extra(pieces.choices[0], "token_ids")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results[i] for i in range(12)] == expected
    wait_idle(chat_model.slices[0].engine)
