"""Chat over gRPC: `messages` rendered with the checkpoint's template, the errors when
that cannot be done, and the default model (SmolLM2, no model flag) answering a
question end to end."""

from __future__ import annotations

import pytest

from meshserve.engine.sampling_params import InvalidRequestError
from meshserve.models.config import load_hf_config
from meshserve.models.tokenizer import find_tokenizer
from meshserve.serving.proto import meshserve_pb2 as pb
from meshserve.serving.requests import ModelLimits, prepare
from tests import tokenizer_files
from tests.serving_fixtures import (  # noqa: F401
    ServeProcess,
    demo_ckpt,
    demo_model,
    error_of,
    request,
    running_server,
    stub_for,
    subprocess_env,
    tokens_of,
)

QUESTION = "What is the capital of France?"
LIMITS = ModelLimits(vocab_size=512, max_model_len=256, max_logprobs=4,
                     max_request_bytes=1 << 20, default_max_tokens=16)


def _chat(*pairs: tuple[str, str], **fields) -> pb.GenerateRequest:
    return request(messages=list(pairs), **fields)


@pytest.fixture(scope="module")
def qwen2_tokenizer(tmp_path_factory):
    folder = tokenizer_files.write_tokenizer("qwen2", str(tmp_path_factory.mktemp("qwen2")))
    return folder, find_tokenizer(folder, load_hf_config(folder))


def test_messages_become_the_template_s_prompt_ids(qwen2_tokenizer):
    import transformers

    folder, tokenizer = qwen2_tokenizer
    chat = [("system", "Be brief."), ("user", QUESTION)]
    prepared = prepare(_chat(*chat, max_tokens=4), tokenizer, LIMITS, "r1")
    expected = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
        [{"role": r, "content": c} for r, c in chat], add_generation_prompt=True,
        tokenize=True, return_dict=True)["input_ids"]
    assert prepared.prompt_ids == list(expected)


def test_bad_chats_are_invalid_arguments_naming_the_reason(qwen2_tokenizer, tmp_path):
    _, tokenizer = qwen2_tokenizer
    with pytest.raises(InvalidRequestError, match="role 'robot'"):
        prepare(_chat(("robot", "hi")), tokenizer, LIMITS, "r2")
    with pytest.raises(InvalidRequestError, match="prompt and messages were set"):
        prepare(_chat(("user", "hi"), prompt="also"), tokenizer, LIMITS, "r3")
    mistral = tokenizer_files.write_tokenizer("mistral", str(tmp_path / "mistral"))
    strict = find_tokenizer(mistral, load_hf_config(mistral))
    with pytest.raises(InvalidRequestError, match="alternate"):
        prepare(_chat(("user", "a"), ("user", "b")), strict, LIMITS, "r4")


def test_a_model_without_a_chat_template_fails_precondition(demo_model):  # noqa: F811
    import grpc

    with running_server(demo_model) as server:
        _, stub = stub_for(server.target)
        err = error_of(stub.Generate, _chat(("user", "Hello"), max_tokens=4))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no chat template" in err.details()
        assert not stub.GetServerInfo(pb.GetServerInfoRequest()).has_chat_template
        # The server keeps serving plain prompts.
        assert len(tokens_of(stub.Generate(request("Hello", max_tokens=3, ignore_eos=True)))) == 3


def test_serve_without_a_model_flag_answers_a_chat_question(smollm2_ckpt):
    """`meshserve serve` with no model flag serves SmolLM2 (converted into this run's
    cache by the fixture, as a first start would); a chat question gets its answer."""
    with ServeProcess("--warmup=false", "--max-model-len", "256", "--max-seqs", "2",
                      env=subprocess_env(), timeout=300) as server:
        assert "default model SmolLM2-135M-Instruct" in server.log
        _, stub = stub_for(server.target)
        info = stub.GetServerInfo(pb.GetServerInfoRequest())
        assert info.has_chat_template and info.has_tokenizer
        responses = list(stub.Generate(_chat(("user", QUESTION), max_tokens=32), timeout=240))
        text = "".join(r.text for r in responses)
        assert "Paris" in text, text
        ids = tokens_of(responses)
        assert responses[-1].finish_reason == "stop"  # <|im_end|> from the template's EOS
        whole = stub.Detokenize(pb.DetokenizeRequest(token_ids=ids)).text
        assert text == whole
