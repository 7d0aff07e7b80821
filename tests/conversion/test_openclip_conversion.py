"""open_clip text tower -> transformers CLIPTextModel conversion, checked against golden open_clip outputs."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import AddedToken
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from helpers import FIXTURES

from diffusers_microdit.conversion.openclip import convert_openclip_text_encoder, openclip_text_state_dict_to_transformers
from diffusers_microdit.pipelines.openclip_tokenizer import OPENCLIP_CONTEXT_LENGTH, configure_openclip_tokenizer

FIXTURE_DIR = FIXTURES / "openclip_text"
STATE_DICT_FILE = FIXTURE_DIR / "openclip_text_public_state_dict.safetensors"
NUM_HEADS = 4  # the fixture tower's head count, which the weights cannot tell


@pytest.fixture(scope="module")
def spec():
    return json.loads((FIXTURE_DIR / "openclip_text_public.json").read_text())


@pytest.fixture(scope="module")
def golden():
    return load_file(FIXTURE_DIR / "openclip_text_public_io.safetensors")


@pytest.fixture(scope="module")
def open_clip_state_dict():
    return load_file(STATE_DICT_FILE)


@pytest.fixture(scope="module")
def model():
    return convert_openclip_text_encoder(STATE_DICT_FILE, num_attention_heads=NUM_HEADS)


def assert_matches(name, actual, expected, spec, record_property):
    tolerance = spec["tolerances"]["float32_cpu"][name]
    max_abs_diff = (actual - expected).abs().max().item()
    print(f"{name}: max abs diff {max_abs_diff:.3g}")
    record_property(f"max_abs_diff_{name}", max_abs_diff)
    torch.testing.assert_close(actual, expected, atol=tolerance["atol"], rtol=tolerance["rtol"])


def test_config_matches_fixture_spec(model, spec):
    for name, value in spec["hf_conversion"]["config_for_this_fixture"].items():
        assert getattr(model.config, name) == value, name
    assert not model.training


@torch.no_grad()
def test_outputs_match_open_clip(model, golden, spec, record_property):
    # No attention_mask: MicroDiT runs the tower with its causal mask only and consumes every position.
    output = model(input_ids=golden["input_ids"], output_hidden_states=True)

    assert_matches("last_hidden_state", output.last_hidden_state, golden["last_hidden_state"], spec, record_property)
    assert_matches("pooled_output", output.pooler_output, golden["pooled_output"], spec, record_property)
    # The fixture stacks [embeddings, block 1, ..., block L] along the first dim.
    hidden_states = torch.stack(output.hidden_states)
    assert_matches("hidden_states", hidden_states, golden["hidden_states"], spec, record_property)


@torch.no_grad()
def test_state_dict_helper_loads_projection_model(model, open_clip_state_dict, golden, spec, record_property):
    with_projection = CLIPTextModelWithProjection(model.config).eval()
    with_projection.load_state_dict(openclip_text_state_dict_to_transformers(open_clip_state_dict), strict=True)

    text_embeds = with_projection(input_ids=golden["input_ids"]).text_embeds
    assert_matches("text_embeds", text_embeds, golden["text_embeds"], spec, record_property)


def assert_same_weights(a, b):
    a_state, b_state = a.state_dict(), b.state_dict()
    assert a_state.keys() == b_state.keys()
    for key in a_state:
        assert torch.equal(a_state[key], b_state[key]), key


def test_sources_give_the_same_model(model, open_clip_state_dict, tmp_path):
    pt_file = tmp_path / "text.pt"
    torch.save(dict(open_clip_state_dict), pt_file)
    for source in (open_clip_state_dict, pt_file, str(pt_file)):
        assert_same_weights(convert_openclip_text_encoder(source, num_attention_heads=NUM_HEADS), model)


def test_full_clip_checkpoint_with_wrappers(model, open_clip_state_dict, tmp_path):
    full_clip = {
        **open_clip_state_dict,
        "visual.conv1.weight": torch.zeros(8, 3, 14, 14),
        "visual.proj": torch.zeros(8, 40),
        "logit_scale": torch.tensor(4.6052),
    }
    checkpoint = {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in full_clip.items()}}
    checkpoint_file = tmp_path / "epoch_3.pt"
    torch.save(checkpoint, checkpoint_file)
    assert_same_weights(convert_openclip_text_encoder(checkpoint_file, num_attention_heads=NUM_HEADS), model)

    # CustomTextCLIP layout: the text tower under `text.`
    custom_text = {f"text.{k}": v for k, v in open_clip_state_dict.items()} | {"logit_scale": torch.tensor(1.0)}
    assert_same_weights(convert_openclip_text_encoder(custom_text, num_attention_heads=NUM_HEADS), model)


def test_missing_and_unexpected_keys_are_named(open_clip_state_dict):
    incomplete = {k: v for k, v in open_clip_state_dict.items() if k != "transformer.resblocks.1.ln_2.bias"}
    with pytest.raises(ValueError, match=r"missing keys: transformer\.resblocks\.1\.ln_2\.bias"):
        convert_openclip_text_encoder(incomplete, num_attention_heads=NUM_HEADS)

    layer_scale = {**open_clip_state_dict, "transformer.resblocks.0.ls_1.gamma": torch.ones(64)}
    with pytest.raises(ValueError, match=r"unexpected keys: transformer\.resblocks\.0\.ls_1\.gamma"):
        convert_openclip_text_encoder(layer_scale, num_attention_heads=NUM_HEADS)


def test_shape_mismatch_raises_value_error(open_clip_state_dict):
    narrow_mlp = {**open_clip_state_dict, "transformer.resblocks.1.mlp.c_fc.weight": torch.zeros(128, 64)}
    with pytest.raises(ValueError, match=r"encoder\.layers\.1\.mlp\.fc1\.weight"):
        convert_openclip_text_encoder(narrow_mlp, num_attention_heads=NUM_HEADS)


def test_torch_dtype(open_clip_state_dict):
    model = convert_openclip_text_encoder(
        open_clip_state_dict, num_attention_heads=NUM_HEADS, torch_dtype=torch.bfloat16
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@torch.no_grad()
def test_save_pretrained_round_trip(model, golden, tmp_path):
    model.save_pretrained(tmp_path)
    reloaded = CLIPTextModel.from_pretrained(tmp_path).eval()

    assert_same_weights(reloaded, model)
    assert reloaded.config.eos_token_id == model.config.eos_token_id
    expected = model(input_ids=golden["input_ids"])
    actual = reloaded(input_ids=golden["input_ids"])
    assert torch.equal(actual.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(actual.pooler_output, expected.pooler_output)


# --- tokenizer -------------------------------------------------------------------------------------------------

SOT, EOT = 49406, 49407
# The fixture captions 0 and 1 are one BPE token per word; their real CLIP ids are in `reference_tokenizer_ids`.
CAPTION_WORDS = (
    ["a", "photo", "of", "a", "cat"],
    ["an", "astronaut", "riding", "a", "horse", "on", "the", "moon", ",", "digital", "art", ",", "highly",
     "detailed", ",", "4", "k"],
)  # fmt: skip


def clip_byte_alphabet():
    """The 256 byte symbols of CLIP's byte-level BPE, in the order of ids 0..255 of the real vocab."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    remapped = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(remapped))]


def apply_merges(parts, merges):
    """Byte-pair encoding of one word: repeatedly merge the adjacent pair of lowest rank."""
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    while True:
        candidates = [(ranks[pair], i) for i, pair in enumerate(zip(parts, parts[1:])) if pair in ranks]
        if not candidates:
            return parts
        i = min(candidates)[1]
        parts = [*parts[:i], parts[i] + parts[i + 1], *parts[i + 2 :]]


def write_tiny_clip_vocab(directory, word_ids):
    """Write vocab.json / merges.txt of a small CLIP BPE where each word of `word_ids` is one token at its real id."""
    symbols = clip_byte_alphabet()
    vocab = {symbol: i for i, symbol in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges, next_free_id = [], 40000  # intermediate merge results take ids no caption word uses
    for word, token_id in word_ids.items():
        # Merges added for earlier words can split this word differently, so merge what BPE actually yields.
        while len(parts := apply_merges([*word[:-1], word[-1] + "</w>"], merges)) > 1:
            merges.append((parts[0], parts[1]))
            if parts[0] + parts[1] not in vocab:
                vocab[parts[0] + parts[1]], next_free_id = next_free_id, next_free_id + 1
        if len(word) == 1:  # single characters are byte symbols, already at their real id
            assert vocab[parts[0]] == token_id, word
        vocab[parts[0]] = token_id
    vocab |= {"<|startoftext|>": SOT, "<|endoftext|>": EOT}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def open_clip_layout(content_ids):
    """open_clip's SimpleTokenizer framing: [SOT] ids [EOT], first 77 kept with the last set to EOT, 0-padded."""
    ids = [SOT, *content_ids, EOT][:OPENCLIP_CONTEXT_LENGTH]
    ids[-1] = EOT
    return ids + [0] * (OPENCLIP_CONTEXT_LENGTH - len(ids))


@pytest.fixture(scope="module")
def reference_ids(golden):
    return golden["reference_tokenizer_ids"]


@pytest.fixture
def tokenizer_dir(tmp_path, reference_ids):
    word_ids = {}
    for row, words in enumerate(CAPTION_WORDS):
        for word, token_id in zip(words, reference_ids[row, 1 : len(words) + 1].tolist()):
            word_ids[word] = token_id
    write_tiny_clip_vocab(tmp_path, word_ids)
    return tmp_path


def encode(tokenizer, captions):
    return tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids


def test_tokenizer_matches_open_clip_ids(tokenizer_dir, spec, reference_ids):
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.pad_token_id == EOT  # the transformers default, which MicroDiT must not see

    tokenizer = configure_openclip_tokenizer(tokenizer)
    assert tokenizer.pad_token_id == 0 and tokenizer.model_max_length == OPENCLIP_CONTEXT_LENGTH
    ids = encode(tokenizer, spec["tokens"]["captions"][:2])
    assert ids.shape == (2, OPENCLIP_CONTEXT_LENGTH)
    assert torch.equal(ids, reference_ids[:2])


def test_tokenizer_truncates_like_open_clip(tokenizer_dir):
    tokenizer = configure_openclip_tokenizer(CLIPTokenizer.from_pretrained(tokenizer_dir))
    caption = " ".join(["a photo of a cat"] * 20)
    content_ids = tokenizer(caption, add_special_tokens=False).input_ids
    assert len(content_ids) == 100

    ids = encode(tokenizer, [caption])[0].tolist()
    assert ids == open_clip_layout(content_ids)
    assert ids[-1] == EOT and len(ids) == OPENCLIP_CONTEXT_LENGTH


def test_exclamation_mark_stays_a_bpe_token(tokenizer_dir, tmp_path_factory):
    # open_clip encodes a standalone "!" as the BPE token "!</w>" (id 256); id 0 only ever means padding.
    caption = "a cat! a cat !"
    expected = open_clip_layout([320, 2368, 256, 320, 2368, 256])
    tokenizer = configure_openclip_tokenizer(CLIPTokenizer.from_pretrained(tokenizer_dir))
    assert encode(tokenizer, [caption])[0].tolist() == expected

    # A tokenizer where "!" became an added token (how a config with pad_token "!" loads) is repaired.
    registered = CLIPTokenizer.from_pretrained(tokenizer_dir)
    registered.add_tokens([AddedToken("!", special=True, normalized=False)], special_tokens=True)
    assert 0 in registered.added_tokens_decoder
    assert encode(configure_openclip_tokenizer(registered), [caption])[0].tolist() == expected

    # Saving the configured tokenizer writes pad_token "!"; reloading and configuring again gives the same ids.
    saved = tmp_path_factory.mktemp("saved_tokenizer")
    tokenizer.save_pretrained(saved)
    reloaded = configure_openclip_tokenizer(CLIPTokenizer.from_pretrained(saved))
    assert 0 not in reloaded.added_tokens_decoder
    assert encode(reloaded, [caption])[0].tolist() == expected
