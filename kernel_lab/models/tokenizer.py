"""Build a Hugging Face fast tokenizer from a GGUF file's metadata and save it for mlx-lm.

The vocabulary, merges, special tokens and chat template are read with the `gguf`
package; transformers' own GGUF builders (`convert_gguf_tokenizer`) turn them into a
`tokenizers.Tokenizer`. (transformers' GGUF *reader* needs torch, so it is not used.)
"""

import json

from tokenizers import pre_tokenizers

_SPECIAL_TOKEN_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}

# llama.cpp pre-tokenizers transformers has no split for (SmolLM's splits digits one by one).
_EXTRA_PRE_TOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    ),
}


def tokenizer_metadata(fields):
    """(tokenizer dict, tokenizer config) from GGUF metadata {key: value}, named as transformers expects."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    def pick(group):
        return {
            name: fields[f"tokenizer.{key}"]
            for key, name in GGUF_TOKENIZER_MAPPING[group].items()
            if f"tokenizer.{key}" in fields
        }

    tokenizer, config = pick("tokenizer"), pick("tokenizer_config")
    if "tokens" not in tokenizer:
        raise ValueError("the GGUF file has no tokenizer.ggml.tokens: it carries no tokenizer")
    if tokenizer.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece vocabularies
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = fields.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            config[name] = tokenizer["tokens"][int(token_id)]
    return tokenizer, config


def build_tokenizer(architecture, fields):
    """A transformers fast tokenizer for the GGUF metadata `fields`."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    tokenizer_dict, config = tokenizer_metadata(fields)
    backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    extra = _EXTRA_PRE_TOKENIZERS.get(tokenizer_dict.get("pre_tokenizer_type"))
    if extra is not None:
        backend.pre_tokenizer = extra()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config), config


def save_tokenizer(architecture, fields, directory):
    """Write tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    tokenizer, config = build_tokenizer(architecture, fields)
    tokenizer.save_pretrained(str(directory))
    # Portable config: older transformers do not know the v5 class name or chat_template.jinja.
    config_path = directory / "tokenizer_config.json"
    saved = json.loads(config_path.read_text())
    saved["tokenizer_class"] = "PreTrainedTokenizerFast"
    if config.get("chat_template"):
        saved["chat_template"] = config["chat_template"]
    for key in ("add_bos_token", "add_eos_token"):
        if key in config:
            saved[key] = bool(config[key])
    config_path.write_text(json.dumps(saved, indent=2, ensure_ascii=False))
    special = {k: config[k] for k in _SPECIAL_TOKEN_IDS if config.get(k) is not None}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False))
