"""open_clip-compatible setup of a transformers CLIP tokenizer, as MicroDiT's text conditioning needs it."""

from __future__ import annotations

import json

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

OPENCLIP_CONTEXT_LENGTH = 77
# open_clip pads with id 0, which is "!" in the CLIP vocab, not a dedicated pad token.
OPENCLIP_PAD_TOKEN_ID = 0  # also the pad id of the converted text encoder's config (conversion.openclip)


def _without_added_token(tokenizer: PreTrainedTokenizerBase, token_id: int) -> PreTrainedTokenizerBase:
    """Rebuild a tokenizers-backed `tokenizer` with `token_id` kept in the BPE vocab but no longer an added token."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state["added_tokens"] = [token for token in state["added_tokens"] if token["id"] != token_id]
    return type(tokenizer)(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)),
        name_or_path=tokenizer.name_or_path,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        unk_token=tokenizer.unk_token,
        # A pad token given here is registered as an added token again; the caller sets the pad id afterwards.
        pad_token=tokenizer.eos_token,
    )


def configure_openclip_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make a transformers CLIP tokenizer (standard CLIP BPE vocab) produce open_clip's ids for MicroDiT.

    open_clip writes `[SOT] tokens [EOT]`, keeps the first 77 ids with the last one set to EOT, and pads with id 0
    ("!" in the CLIP vocab). The Hugging Face tokenizer of `apple/DFN5B-CLIP-ViT-H-14-378` pads with
    `<|endoftext|>` (49407) instead. MicroDiT consumes the text states at the pad positions too, so that pad id would
    change the DiT's conditioning. This sets the pad id to 0, `model_max_length` to 77, and right-side padding and
    truncation. Padding and truncation are still requested per call, as with any transformers tokenizer:
    `tokenizer(captions, padding="max_length", truncation=True)`.

    The pad token is set on the instance only. A tokenizer *loaded* with `pad_token="!"` in its config (one saved
    after this call, or Stable Diffusion 2's) has "!" registered as a special added token, so every "!" in a
    caption encodes as id 0 instead of its BPE token (diffusers issue #4153). Such a tokenizer is rebuilt without
    that added token and the copy is returned; pass every freshly loaded tokenizer through this function.

    open_clip also cleans text with `ftfy.fix_text` and HTML unescaping, which transformers does not do, so captions
    with mojibake or HTML entities can still tokenise differently.
    """
    if OPENCLIP_PAD_TOKEN_ID in tokenizer.added_tokens_decoder:
        tokenizer = _without_added_token(tokenizer, OPENCLIP_PAD_TOKEN_ID)
    tokenizer.pad_token_id = OPENCLIP_PAD_TOKEN_ID
    tokenizer.model_max_length = OPENCLIP_CONTEXT_LENGTH
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"
    return tokenizer
