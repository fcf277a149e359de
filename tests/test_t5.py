"""t5.py against transformers (test-only reference) on tiny random checkpoints, offline, CPU.

Three configs cover the shapes that matter: v1.0 (relu, head tied to the embedding with the d_model**-0.5
rescale), v1.1 / FLAN-T5 (gated tanh-GELU, separate lm_head, written as the hub does), and an uneven one
(3 encoder / 2 decoder blocks, num_heads*d_kv = 24 != d_model = 32, saved by transformers 5 with its
"tie_word_embeddings=False" semantics: head tied, no rescale).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import t5
from conftest import edited_checkpoint

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=256, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
CONFIGS = {
    "v1_0_relu_tied": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "v1_1_gated_untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "uneven_heads": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_layers=3,
                         num_decoder_layers=2, num_heads=3),
}


def make_checkpoint(folder: Path, name: str, amplify: bool = True) -> Path:
    torch.manual_seed(list(CONFIGS).index(name))
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**{**BASE, **CONFIGS[name]})).eval()
    with torch.no_grad():
        if amplify:
            # Make every parameter matter (norms, position biases) and keep greedy decoding from collapsing onto
            # one repeated token at once: wider projections, smaller input embedding than transformers' init.
            for key, p in model.named_parameters():
                if "layer_norm" in key:
                    p.mul_(1 + 0.2 * torch.randn_like(p))
                elif "relative_attention_bias" in key:
                    p.normal_(0.0, 1.0)
                elif key != "shared.weight":
                    p.normal_(0.0, 2.0 / p.shape[1] ** 0.5)
            model.shared.weight.mul_(0.1)
    if name == "v1_1_gated_untied":
        # transformers 5 ties the head to `shared` on construction; give it its own weights like FLAN-T5.
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.2)
    model.save_pretrained(folder)
    if name == "v1_1_gated_untied":  # the hub's flan-t5 config.json: tie_word_embeddings=false, no scale key
        config = json.loads((folder / "config.json").read_text())
        config.pop("scale_decoder_outputs")
        (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return {name: make_checkpoint(tmp_path_factory.mktemp(name), name) for name in CONFIGS}


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """A padded batch: rows of length 24, 9 and 3 (far and near buckets, and a short row)."""
    g = torch.Generator().manual_seed(0)
    lengths = [24, 9, 3]
    ids = torch.randint(3, BASE["vocab_size"], (3, 24), generator=g)
    mask = (torch.arange(24)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    ids[torch.arange(3), torch.tensor(lengths) - 1] = 1  # </s> at each row's end
    decoder_ids = torch.randint(2, BASE["vocab_size"], (3, 20), generator=g)
    decoder_ids[:, 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def hf_logits(folder: Path, batch: dict) -> torch.Tensor:
    ref = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        return ref(**batch).logits


# --------------------------------------------------------------------------------------------------
# Relative position buckets: values worked out by hand from the formula (T5 defaults 32 buckets, 128 max
# distance), avoiding exact powers of two where float32 rounding decides the floor.


def test_relative_position_bucket_golden_table():
    # bidirectional: 16 buckets per side, 8 exact; keys to the right (+) get offset 16.
    # e.g. -20: 8 + floor(ln(20/8)/ln(128/8) * 8) = 8 + floor(2.64) = 10; +40: 16 + 8 + floor(4.64) = 28.
    bidirectional = {0: 0, -1: 1, 1: 17, -7: 7, 7: 23, -8: 8, 8: 24, -12: 9, 12: 25, -20: 10, -40: 12,
                     40: 28, -100: 15, -127: 15, -128: 15, -5000: 15, 5000: 31}
    # causal: 32 buckets, 16 exact, future positions -> 0. e.g. -40: 16 + floor(ln(40/16)/ln(128/16)*16) = 23.
    causal = {5: 0, 1: 0, 0: 0, -1: 1, -15: 15, -16: 16, -20: 17, -40: 23, -100: 30, -127: 31, -128: 31,
              -5000: 31}
    for table, bidi in ((bidirectional, True), (causal, False)):
        rel = torch.tensor(list(table))
        got = t5.relative_position_bucket(rel, bidirectional=bidi, num_buckets=32, max_distance=128)
        assert dict(zip(table, got.tolist())) == table, f"bidirectional={bidi}"


def test_position_bias_matches_transformers(checkpoints):
    ours = t5.T5.from_pretrained(checkpoints["v1_0_relu_tied"])
    ref = transformers.T5ForConditionalGeneration.from_pretrained(checkpoints["v1_0_relu_tied"]).eval()
    for stack, ref_stack in ((ours.encoder, ref.encoder), (ours.decoder, ref.decoder)):
        expected = ref_stack.block[0].layer[0].SelfAttention.compute_bias(40, 40)
        assert torch.equal(stack.relative_attention.position_bias(40, 40), expected)


# --------------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_on_padded_batch(checkpoints, batch, name):
    ours = t5.T5.from_pretrained(checkpoints[name])
    assert ours.config.tie_word_embeddings == (name != "v1_1_gated_untied")
    assert ours.config.scale_decoder_outputs == (name == "v1_0_relu_tied")
    with torch.no_grad():
        logits = ours(**batch)
    ref = hf_logits(checkpoints[name], batch)
    assert logits.shape == ref.shape == (3, 20, BASE["vocab_size"])
    assert rel_err(logits, ref) <= 1e-4
    # Right-padded decoder inputs with a decoder attention mask (scoring several targets in one batch).
    decoder_mask = (torch.arange(20)[None, :] < torch.tensor([[20], [12], [5]])).long()
    with torch.no_grad():
        masked = ours(**batch, decoder_attention_mask=decoder_mask)
    ref_masked = hf_logits(checkpoints[name], {**batch, "decoder_attention_mask": decoder_mask})
    assert rel_err(masked, ref_masked) <= 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generate_token_identical_to_transformers(checkpoints, batch, name):
    ours = t5.T5.from_pretrained(checkpoints[name])
    ref = transformers.T5ForConditionalGeneration.from_pretrained(checkpoints[name]).eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}

    def hf_generate(eos: int) -> torch.Tensor:
        out = ref.generate(**inputs, max_new_tokens=24, do_sample=False, num_beams=1, eos_token_id=eos,
                           pad_token_id=0, decoder_start_token_id=0)
        return out[:, 1:]  # transformers returns the decoder start token first

    natural = hf_generate(eos=1)
    assert torch.equal(ours.generate(**inputs, max_new_tokens=24), natural)
    # Also take as EOS a token that row 1 produces mid-way, so rows stop at different steps and get padded.
    eos = int(next(t for t in natural[1, 3:].tolist() if t > 1))
    expected = hf_generate(eos=eos)
    got = ours.generate(**inputs, max_new_tokens=24, eos_id=eos)
    assert torch.equal(got, expected), (got, expected)
    assert len(set(got.flatten().tolist())) > 4 and (got == eos).any(1).sum() >= 1


def test_cached_decoding_equals_full_forward(checkpoints, batch):
    for name in CONFIGS:
        model = t5.T5.from_pretrained(checkpoints[name])
        with torch.no_grad():
            full = model(**batch)
            encoder_out = model.encode(batch["input_ids"], batch["attention_mask"])
            cache = model.start_decoding(encoder_out, batch["attention_mask"], max_length=32)
            steps = torch.stack([model.decode_step(batch["decoder_input_ids"][:, t:t + 1], t, cache)
                                 for t in range(batch["decoder_input_ids"].shape[1])], dim=1)
        assert rel_err(steps, full) <= 1e-5, name


def test_unpadded_batch_matches_padded_batch(checkpoints, batch):
    """An all-ones mask takes the mask-free path (position bias alone, no cross-attention mask); the same rows
    inside a padded batch take the masked path. Both must agree, in the forward and in cached decoding."""
    full_row = batch["attention_mask"].sum(1) == batch["attention_mask"].shape[1]
    assert full_row.tolist() == [True, False, False]
    unpadded = {k: v[full_row].repeat(2, 1) for k, v in batch.items()}  # two copies of the unpadded row
    for name in CONFIGS:
        model = t5.T5.from_pretrained(checkpoints[name])
        with torch.no_grad():
            assert t5.mask_if_padded(unpadded["attention_mask"]) is None
            alone = model(**unpadded)
            in_padded_batch = model(**batch)[full_row]
            decoder_mask = torch.ones_like(unpadded["decoder_input_ids"])
            assert rel_err(model(**unpadded, decoder_attention_mask=decoder_mask), alone) == 0.0
        assert rel_err(alone[:1], in_padded_batch) <= 1e-5, name
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        generated = model.generate(**inputs, max_new_tokens=12)
        alone_generated = model.generate(unpadded["input_ids"], unpadded["attention_mask"], max_new_tokens=12)
        assert torch.equal(alone_generated[0], generated[0, :alone_generated.shape[1]]), name


def test_generate_arguments(checkpoints, batch):
    model = t5.T5.from_pretrained(checkpoints["v1_1_gated_untied"])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    greedy = model.generate(**inputs, max_new_tokens=8)
    assert greedy.shape[0] == 3 and greedy.shape[1] <= 8
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(**inputs, max_new_tokens=0)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_bf16_autocast_forward_and_generate(tmp_path, batch, device):
    # transformers' own initialisation: the amplified test weights are chaotic, and bf16 drifts on them
    # about as much for transformers as for us (both ~0.4 relative), which would test nothing.
    folder = make_checkpoint(tmp_path, "v1_1_gated_untied", amplify=False)
    model = t5.T5.from_pretrained(folder, device=device)
    on_device = {k: v.to(device) for k, v in batch.items()}
    inputs = {k: on_device[k] for k in ("input_ids", "attention_mask")}
    ref = transformers.T5ForConditionalGeneration.from_pretrained(folder).to(device)
    with torch.no_grad():
        fp32 = model(**on_device)
        with torch.autocast(device, dtype=torch.bfloat16):
            bf16 = model(**on_device)
            ref_bf16 = ref(**on_device).logits
            out = model.generate(**inputs, max_new_tokens=10)
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all()
    budget = max(1.25 * rel_err(ref_bf16, fp32), 0.02)  # no more drift than transformers' own bf16
    assert rel_err(bf16, fp32) <= budget
    assert_greedy(ref, inputs, out, slack=2 * (bf16.float() - fp32).abs().max().item())
    # A bf16 checkpoint (weights converted at load) also runs and stays as close.
    model16 = t5.T5.from_pretrained(folder, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        logits16 = model16(**on_device)
        out16 = model16.generate(**inputs, max_new_tokens=10)
    assert rel_err(logits16, fp32) <= budget
    assert_greedy(ref, inputs, out16, slack=2 * (logits16.float() - fp32).abs().max().item())


def assert_greedy(ref, inputs: dict[str, torch.Tensor], out: torch.Tensor, slack: float) -> None:
    """`out` is a greedy decode by transformers' fp32 model, up to bf16 rounding: every token up to its row's
    </s> has a logit within `slack` (twice the bf16 forward's largest error) of the best one, in one full
    teacher-forced forward over the decoded tokens (no cache)."""
    assert out.shape[0] == 3 and 1 <= out.shape[1] <= 10
    with torch.no_grad():
        decoder_input_ids = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)  # T5 starts at pad
        logits = ref(**inputs, decoder_input_ids=decoder_input_ids).logits.float()
    chosen = logits.gather(-1, out[..., None])[..., 0]
    upto_eos = (out == 1).long().cumsum(1) - (out == 1).long() == 0  # positions up to and including </s>
    gap = (logits.max(-1).values - chosen)[upto_eos]
    assert gap.max().item() <= slack, (gap.max().item(), slack)


# --------------------------------------------------------------------------------------------------
# Saving and loading


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_ours_to_transformers(tmp_path, batch, name):
    config = t5.T5Config(**{**BASE, **CONFIGS[name]})
    torch.manual_seed(1)
    ours = t5.T5(config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.3)  # random everywhere, norms included, so a misnamed weight shows up
        ours.save_pretrained(tmp_path)
        expected = ours(**batch)
    assert rel_err(hf_logits(tmp_path, batch), expected) <= 1e-4
    again = t5.T5.from_pretrained(tmp_path)
    assert again.config == ours.config
    with torch.no_grad():
        assert torch.equal(again(**batch), expected)
    assert all(p.requires_grad for p in again.parameters())


def test_sharded_checkpoint_loads(tmp_path, checkpoints, batch):
    ref = transformers.T5ForConditionalGeneration.from_pretrained(checkpoints["uneven_heads"])
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    with torch.no_grad():
        assert rel_err(t5.T5.from_pretrained(tmp_path)(**batch), hf_logits(tmp_path, batch)) <= 1e-4


def test_alias_keys_and_distinct_head_in_tied_config(tmp_path, checkpoints, batch):
    """Older checkpoints carry encoder/decoder.embed_tokens (and lm_head for tied models) as copies of
    `shared`: accepted. transformers 5 re-saves FLAN-T5 as tie_word_embeddings=true plus a distinct head:
    the head is kept, as transformers does."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "aliases"
    shutil.copytree(checkpoints["v1_0_relu_tied"], folder)
    state = load_file(folder / "model.safetensors")
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
        state[alias] = state["shared.weight"].clone()
    save_file(state, folder / "model.safetensors")
    model = t5.T5.from_pretrained(folder)
    assert model.config.tie_word_embeddings
    with torch.no_grad():
        assert rel_err(model(**batch), hf_logits(checkpoints["v1_0_relu_tied"], batch)) <= 1e-4

    folder = tmp_path / "resaved_flan"
    shutil.copytree(checkpoints["v1_1_gated_untied"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True,
                                                    "scale_decoder_outputs": False}))
    model = t5.T5.from_pretrained(folder)
    assert not model.config.tie_word_embeddings
    with torch.no_grad():
        assert rel_err(model(**batch), hf_logits(checkpoints["v1_1_gated_untied"], batch)) <= 1e-4




def test_strict_loading_names_the_offending_key(tmp_path, checkpoints):
    src = checkpoints["v1_1_gated_untied"]
    key = "decoder.block.1.layer.1.EncDecAttention.k.weight"
    cases = {
        "missing": (lambda s: s.pop(key), rf"missing keys \['{key}'\]"),
        "unexpected": (lambda s: s.__setitem__("encoder.block.9.extra.weight", torch.zeros(2)),
                       r"unexpected keys \['encoder.block.9.extra.weight'\]"),
        "shape": (lambda s: s.__setitem__(key, torch.zeros(24, 32)), rf"{key}: model \(32, 32\) vs checkpoint \(24, 32\)"),
        "untied_alias": (lambda s: s.__setitem__("encoder.embed_tokens.weight", torch.zeros(256, 32)),
                         "encoder.embed_tokens.weight differs from shared.weight"),
        "missing_head": (lambda s: s.pop("lm_head.weight"), r"missing keys \['lm_head.weight'\]"),
    }
    for case, (edit, message) in cases.items():
        folder = edited_checkpoint(src, tmp_path / case, edit)
        with pytest.raises(ValueError, match=message):
            t5.T5.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text("{}")
        t5.T5.from_pretrained(tmp_path / "empty")


def test_unsupported_config_values_raise_naming_the_field():
    good = transformers.T5Config(**BASE).to_dict()
    good.pop("scale_decoder_outputs")  # as in hub configs written before transformers 5
    assert t5.T5Config.from_hf_config(good).num_decoder_layers == 2
    for field, value in [("feed_forward_proj", "gated-silu"), ("model_type", "bart"),
                         ("is_encoder_decoder", False), ("eos_token_id", [1, 2]), ("num_heads", 0),
                         ("relative_attention_num_buckets", 2)]:
        with pytest.raises(ValueError, match=field):
            t5.T5Config.from_hf_config({**good, field: value})
    flan = t5.T5Config.from_hf_config({**good, "tie_word_embeddings": False, "feed_forward_proj": "gated-gelu"})
    assert not flan.tie_word_embeddings and not flan.scale_decoder_outputs and flan.gated
    assert t5.T5Config.from_hf_config(flan.to_hf_config()) == flan


# --------------------------------------------------------------------------------------------------
# Training helpers


def test_shift_right(checkpoints):
    labels = torch.tensor([[5, 6, 1, -100], [7, 1, -100, -100]])
    assert t5.shift_right(labels).tolist() == [[0, 5, 6, 1], [0, 7, 1, 0]]
    ref = transformers.T5ForConditionalGeneration.from_pretrained(checkpoints["v1_0_relu_tied"])
    assert torch.equal(t5.shift_right(labels), ref._shift_right(labels))


def test_training_path_backward(checkpoints, batch):
    """Every parameter's gradient of the training loss equals transformers' (its labels= loss, same weights)."""
    model = t5.T5.from_pretrained(checkpoints["uneven_heads"]).train()
    labels = batch["decoder_input_ids"][:, 1:].masked_fill(batch["decoder_input_ids"][:, 1:] > 80, -100)
    logits = model(batch["input_ids"], batch["attention_mask"], t5.shift_right(labels))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    ref = transformers.T5ForConditionalGeneration.from_pretrained(checkpoints["uneven_heads"]).train()
    ref_loss = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    expected = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert rel_err(p.grad, expected[name].grad) <= 1e-4, name


# --------------------------------------------------------------------------------------------------
# Tokenizer (real T5 vocabulary)


def transformers_t5_tokenizer(spiece: Path):
    """transformers' T5Tokenizer built exactly as `T5Tokenizer.from_pretrained` converts spiece.model, except
    that the protobuf fields are read by sentencepiece (and t5's wire reader for the normalizer charsmap)
    because this environment has no `protobuf`, which transformers' own extractor requires.

    In transformers 5 there is no slow tokenizer: `T5Tokenizer(vocab_file=...)` ignores the file and builds a
    104-token placeholder vocabulary, and T5TokenizerFast is the same class. The converted tokenizer uses
    Metaspace(prepend_scheme="always"), i.e. the legacy behaviour: text right after a special token gets
    sentencepiece's "▁" ("a<extra_id_5>.b" -> ▁ a 32094 ▁ . b </s>). Our Tokenizer matches that."""
    import sentencepiece
    from transformers.convert_slow_tokenizer import T5Converter

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece))
    kwargs = dict(
        vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())],
        unk_id=sp.unk_id(),
        additional_special_tokens=[transformers.AddedToken(sp.id_to_piece(i), normalized=False, special=True)
                                   for i in range(sp.get_piece_size()) if sp.is_control(i)],
        _spm_precompiled_charsmap=t5._sentencepiece_charsmap(spiece.read_bytes()))
    return transformers.T5Tokenizer(**T5Converter.convert_from_spm(**kwargs))


def release_texts(assets: Path) -> list[str]:
    """Every OBQA and ARC question and option, alone and as one "question + options" prompt."""
    texts = []
    for dataset in ("obqa", "arc"):
        for split in ("train", "valid", "test"):
            raw = (assets / "tinyllm_release" / dataset / f"{dataset}_{split}.json").read_text()
            rows = json.loads(raw) if dataset == "arc" else [json.loads(line) for line in raw.splitlines() if line]
            for row in rows:
                options = "\n".join(f"({chr(97 + i)}) {c}" for i, c in enumerate(row["choices"]))
                texts += [row["question"], *row["choices"], f"{row['question']}\nAnswer Choices:\n{options}"]
    return texts


@pytest.fixture(scope="module")
def spiece(assets) -> Path:
    return assets / "t5_tokenizer" / "spiece.model"


SENTINEL_TEXTS = ["The <extra_id_0> walks in <extra_id_1> park.", "<extra_id_99><extra_id_10>x</s>y<pad>",
                  "a<extra_id_5>.b <unk> c", "  spaced\tout\n text  ", "café ½ ’quotes’ — 3°C"]


def test_tokenizer_ids_identical_to_transformers(spiece, assets):
    ours, ref = t5.Tokenizer(spiece), transformers_t5_tokenizer(spiece)
    assert (ours.pad_id, ours.eos_id, ours.vocab_size) == (0, 1, len(ref)) == (0, 1, 32100)
    texts = release_texts(assets) + SENTINEL_TEXTS
    assert len(texts) > 30000
    expected = ref(texts).input_ids
    mismatches = [(t, e) for t, e in zip(texts, expected) if ours.encode(t) != e]
    assert not mismatches, mismatches[:3]
    for text, ids in zip(texts[::50] + SENTINEL_TEXTS, expected[::50] + expected[-len(SENTINEL_TEXTS):]):
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids), text


def test_tokenizer_sentinels(spiece):
    tok = t5.Tokenizer(spiece)
    ids = tok.encode("The <extra_id_0> walks in <extra_id_1> park")
    assert ids[1] == 32099 and ids[4] == 32098 and ids[-1] == 1
    assert tok.encode("<extra_id_99>") == [32000, 1]
    assert tok.decode(ids, skip_special_tokens=False) == "The<extra_id_0> walks in<extra_id_1> park</s>"
    assert tok.decode(ids) == "The walks in park"
    assert t5.Tokenizer.from_pretrained(spiece.parent).encode("Hello world") == [8774, 296, 1]


def test_tokenizer_save_pretrained_loads_in_transformers(tmp_path, spiece):
    tok = t5.Tokenizer(spiece)
    tok.save_pretrained(tmp_path)
    assert {"spiece.model", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in tmp_path.iterdir()}
    ref = transformers_t5_tokenizer(spiece)
    for loaded in (transformers.AutoTokenizer.from_pretrained(tmp_path),
                   transformers.T5Tokenizer.from_pretrained(tmp_path)):
        assert len(loaded) == 32100
        for text in SENTINEL_TEXTS + ["When standing miles away from Mount Rushmore"]:
            assert loaded(text).input_ids == tok.encode(text) == ref(text).input_ids
    assert t5.Tokenizer(tmp_path).encode("Hello world") == [8774, 296, 1]


def test_real_vocabulary_checkpoint_end_to_end(tiny_t5, spiece, assets):
    """conftest's FLAN-T5-shaped checkpoint: real questions through our tokenizer, generation as transformers."""
    tok = t5.Tokenizer(tiny_t5)
    rows = [json.loads(line) for line in
            (assets / "tinyllm_release" / "obqa" / "obqa_test.json").read_text().splitlines()[:4]]
    encoded = [tok.encode(r["question"]) for r in rows]
    width = max(map(len, encoded))
    ids = torch.tensor([e + [tok.pad_id] * (width - len(e)) for e in encoded])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(e) for e in encoded])[:, None]).long()
    ours = t5.T5.from_pretrained(tiny_t5)
    ref = transformers.T5ForConditionalGeneration.from_pretrained(tiny_t5).eval()
    expected = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=1)
    assert torch.equal(ours.generate(ids, mask, max_new_tokens=12), expected[:, 1:])
