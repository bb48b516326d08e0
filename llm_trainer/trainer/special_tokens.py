"""Apply a config's `eos_token` / `pad_token` overrides to a tokenizer and mirror them onto the model's configs."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase


def configure_special_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    eos_token: str | None = None,
    pad_token: str | None = None,
) -> None:
    """Set `tokenizer.eos_token` to `eos_token` (when given) and `tokenizer.pad_token` to `pad_token`, else to the
    tokenizer's own pad token, else to its eos token; copy both ids to the model's text config and, for models that
    generate, to its generation config (eos prepended to the ids generation stops at).

    Raises `ValueError` when a requested token is not in the vocabulary.
    """
    vocab = tokenizer.get_vocab()
    generation_config = getattr(model, "generation_config", None)
    if eos_token is not None:
        if eos_token not in vocab:
            raise ValueError(
                f"`eos_token` {eos_token!r} is not in the tokenizer's vocabulary; pick an existing token."
            )
        tokenizer.eos_token = eos_token
        model.config.get_text_config().eos_token_id = tokenizer.eos_token_id
        if generation_config is not None:
            eos_ids = generation_config.eos_token_id
            eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
            if tokenizer.eos_token_id not in eos_ids:
                generation_config.eos_token_id = [tokenizer.eos_token_id, *eos_ids]
    pad_token = pad_token or tokenizer.pad_token or tokenizer.eos_token
    if pad_token not in vocab:
        raise ValueError(f"`pad_token` {pad_token!r} is not in the tokenizer's vocabulary; pick an existing token.")
    tokenizer.pad_token = pad_token
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    if generation_config is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id
