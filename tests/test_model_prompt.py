"""Decoder side: which tokenizer reads memory text, splicing latents over placeholders, the adapter."""

import pytest
import torch
from safetensors import safe_open

from model.adapter import MLPAdapter
from model.prompts import MEMORY, MEMORY_END, MEMORY_START, memory_region
from tests.tiny_models import CORPUS, DECODER_HIDDEN, ENCODER_HIDDEN

FAMILIES = ["qwen3", "llama"]
ADAPTER_NAMES = {"norm.weight", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_text_is_tokenized_with_the_encoder_tokenizer(tiny_lclm_factory, family):
    lclm = tiny_lclm_factory(family=family)
    text = CORPUS[:200]
    doc = lclm.tokenize_document(text)
    encoder_ids = lclm.encoder_tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder_ids = lclm.decoder_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(lclm.encoder_tokenizer) != len(lclm.decoder_tokenizer)
    assert doc.ids == encoder_ids
    assert doc.ids != decoder_ids
    assert max(doc.ids) < lclm.encoder.model.get_input_embeddings().weight.shape[0]
    # offsets map every token back onto the text
    assert doc.text_of(0, len(doc)) == text
    assert "".join(doc.text_of(i, i + 1) for i in range(len(doc))) == text


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_tokenizer_has_single_memory_tokens(tiny_lclm_factory, family):
    lclm = tiny_lclm_factory(family=family)
    tok = lclm.decoder_tokenizer
    for token in (MEMORY_START, MEMORY, MEMORY_END):
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1
    ids = tok(memory_region(5), add_special_tokens=False)["input_ids"]
    vocab = tok.get_vocab()
    assert ids == [vocab[MEMORY_START]] + [vocab[MEMORY]] * 5 + [vocab[MEMORY_END]]
    assert lclm.memory_token_id == vocab[MEMORY]
    assert lclm.decoder.get_input_embeddings().weight.shape[0] >= len(tok)
    # the encoder tokenizer knows nothing of them
    assert MEMORY not in lclm.encoder_tokenizer.get_vocab()


@pytest.mark.parametrize("family", FAMILIES)
def test_prepare_splices_regions_in_order(tiny_lclm_factory, family):
    lclm = tiny_lclm_factory(family=family)
    gen = torch.Generator().manual_seed(0)
    r1 = torch.randn(3, lclm.decoder_hidden_size, generator=gen)
    r2 = torch.randn(2, lclm.decoder_hidden_size, generator=gen)
    prompt = lclm.chat(f"Chunk 0: {memory_region(3)}\nChunk 1: {memory_region(2)}\nWhat is the code?")
    prepared = lclm.prepare(prompt, [r1, r2])
    ids = prepared.input_ids[0]
    assert prepared.input_ids.shape == (1, prepared.positions)
    assert prepared.inputs_embeds.shape == (1, prepared.positions, lclm.decoder_hidden_size)
    slots = (ids == lclm.memory_token_id).nonzero().squeeze(-1).tolist()
    assert len(slots) == 5
    embeds = prepared.inputs_embeds[0]
    torch.testing.assert_close(embeds[slots], torch.cat([r1, r2]), atol=0, rtol=0)
    # r1 fills the first region's placeholders, r2 the second's
    vocab = lclm.decoder_tokenizer.get_vocab()
    starts = (ids == vocab[MEMORY_START]).nonzero().squeeze(-1).tolist()
    assert slots == [starts[0] + 1 + i for i in range(3)] + [starts[1] + 1 + i for i in range(2)]
    with torch.inference_mode():
        plain = lclm.decoder.get_input_embeddings()(ids)
    others = [i for i in range(len(ids)) if i not in slots]
    assert torch.equal(embeds[others], plain[others])


def test_prepare_without_regions_is_the_token_embedding(tiny_lclm_factory):
    lclm = tiny_lclm_factory()
    prepared = lclm.prepare(lclm.chat("Hello there"))
    with torch.inference_mode():
        plain = lclm.decoder.get_input_embeddings()(prepared.input_ids)
    assert torch.equal(prepared.inputs_embeds, plain)


def test_prepare_casts_latents_to_the_decoder_dtype(tiny_lclm_factory):
    lclm = tiny_lclm_factory()
    region = torch.randn(2, lclm.decoder_hidden_size, dtype=torch.float64)
    prepared = lclm.prepare(memory_region(2), [region])
    assert prepared.inputs_embeds.dtype == lclm.dtype


@pytest.mark.parametrize("counts,regions", [((3, 2), (3,)), ((3, 2), (3, 3)), ((2,), (2, 1)), ((0,), (1,))])
def test_prepare_refuses_a_count_mismatch(tiny_lclm_factory, counts, regions):
    lclm = tiny_lclm_factory()
    prompt = " and ".join(memory_region(c) for c in counts)
    tensors = [torch.zeros(n, lclm.decoder_hidden_size) for n in regions]
    with pytest.raises(ValueError, match="placeholders"):
        lclm.prepare(prompt, tensors)


def test_compressed_latents_splice_end_to_end(tiny_lclm_factory):
    lclm = tiny_lclm_factory()
    latents = lclm.compress(lclm.tokenize_document(CORPUS[:120]).ids)
    prepared = lclm.prepare(lclm.chat(memory_region(latents.shape[0])), [latents])
    slots = (prepared.input_ids[0] == lclm.memory_token_id).nonzero().squeeze(-1)
    assert torch.equal(prepared.inputs_embeds[0, slots], latents)


@pytest.mark.parametrize("pooling,enc_dim", [("mean", ENCODER_HIDDEN), ("eos", ENCODER_HIDDEN),
                                             ("concat", 4 * ENCODER_HIDDEN)])
def test_adapter_parameter_names_and_shapes(tiny_lclm_factory, tiny_checkpoint_factory, pooling, enc_dim):
    expected = {
        "norm.weight": (enc_dim,),
        "fc1.weight": (DECODER_HIDDEN, enc_dim),
        "fc1.bias": (DECODER_HIDDEN,),
        "fc2.weight": (DECODER_HIDDEN, DECODER_HIDDEN),
        "fc2.bias": (DECODER_HIDDEN,),
    }
    lclm = tiny_lclm_factory(pooling=pooling)
    assert isinstance(lclm.adapter, MLPAdapter)
    assert {k: tuple(v.shape) for k, v in lclm.adapter.state_dict().items()} == expected
    assert lclm.adapter.norm.eps == 1e-6
    path = tiny_checkpoint_factory(pooling=pooling) / "adapter" / "adapter.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == ADAPTER_NAMES
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == expected


def test_adapter_is_norm_linear_gelu_linear():
    torch.manual_seed(0)
    adapter = MLPAdapter(6, 5)
    x = torch.randn(3, 6)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * adapter.norm.weight
    expected = adapter.fc2(torch.nn.functional.gelu(adapter.fc1(normed)))
    torch.testing.assert_close(adapter(x), expected)
