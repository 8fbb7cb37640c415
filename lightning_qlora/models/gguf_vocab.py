"""The tokenizer of a GGUF file (``tokenizer.ggml.*`` metadata) and the Ollama ``Modelfile`` beside it.

The vocabulary is written as llama.cpp's ``convert_hf_to_gguf.py`` writes it (``get_vocab_base``, which is not part
of the ``gguf`` package): one entry per embedding row, rows without a token as ``[PAD<i>]`` (unused), added special
tokens as control tokens and other added tokens as user-defined ones. Merges, special token ids, ``add_bos``/
``add_eos`` and the chat template come from the ``gguf`` package's own :class:`gguf.SpecialVocab`, which reads the
tokenizer files llama.cpp's converter reads.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODELFILE_NAME = "Modelfile"

_CHATML_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)
_LLAMA3_TEMPLATE = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
    "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
_SYS, _USER, _BOT = "\x01SYSTEM\x01", "\x01USER\x01", "\x01ASSISTANT\x01"  # text no real template emits


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"GGUF export needs a fast (tokenizers) tokenizer, got {type(tokenizer).__name__}; "
            "save the model with a tokenizer.json"
        )
    return json.loads(backend.to_str())


def tokenizer_model(tokenizer: Any) -> str:
    """``tokenizer.ggml.model`` for ``tokenizer``: ``"gpt2"`` (byte-level BPE: Llama 3, Qwen, SmolLM, GPT-2).

    Raises:
        ValueError: for another kind of tokenizer (SentencePiece-style byte-fallback BPE, Unigram, WordPiece).
    """
    spec = _tokenizer_json(tokenizer)
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel":
        return "gpt2"
    kind = f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}"
    raise ValueError(
        f"GGUF export writes byte-level BPE tokenizers (Llama 3, Qwen, SmolLM, Mistral Nemo); this tokenizer is "
        f"{kind} with a {decoder.get('type')} decoder; export --format safetensors and convert it with llama.cpp"
    )


def _known_splits() -> dict[str, str]:
    """``{split regex: llama.cpp pre-tokenizer name}`` from transformers' own GGUF tokenizer table."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # older transformers: only the shapes below are recognised
        return {}
    names: dict[str, str] = {}
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        names.setdefault(regex, name)  # the first name listed for a regex is llama.cpp's main one
    return names


def tokenizer_pre(tokenizer: Any) -> str:
    """``tokenizer.ggml.pre``: the llama.cpp name of how ``tokenizer`` splits text before BPE.

    llama.cpp identifies a pre-tokenizer by hashing a test string's tokens against a table of known models; here the
    same names come from the pre-tokenizer's own description: GPT-2's byte-level regex (``gpt-2``), single digits
    then GPT-2's regex (``smollm``), or a ``Split`` regex transformers' GGUF loader knows (``llama-bpe``, ``qwen2``,
    ...). Anything else gets ``default`` and a warning (llama.cpp may then split text differently).
    """
    pre = _tokenizer_json(tokenizer).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = _known_splits().get((steps[0].get("pattern") or {}).get("Regex"))
        if name is not None:
            return name
    log.warning("GGUF export: pre-tokenizer %s is not one llama.cpp names; writing 'default'", kinds)
    return "default"


def _looks_special(token: str) -> bool:
    """llama.cpp's ``does_token_look_special``: control tokens spelled like ``<|...|>`` or ``<pad>``."""
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))


def vocabulary(tokenizer: Any, n_vocab: int) -> tuple[list[str], list[int]]:
    """``(tokens, token types)`` with one entry per embedding row (llama.cpp's ``get_vocab_base``).

    Raises:
        ValueError: if the tokenizer has ids at or beyond ``n_vocab`` (it belongs to another model).
    """
    from gguf import TokenType

    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= n_vocab:
        raise ValueError(
            f"the tokenizer has token id {max(vocab.values())} but the model has {n_vocab} embedding rows; "
            "pass the tokenizer the model was trained with"
        )
    reverse = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(n_vocab):
        token = reverse.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
        elif index in added:
            tokens.append(token)
            types.append(TokenType.CONTROL if added[index].special or _looks_special(token) else TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def add_tokenizer(writer: Any, tokenizer: Any, config: Any, n_vocab: int) -> None:
    """Write ``tokenizer`` into ``writer``'s metadata: model, pre-tokenizer, tokens, types, merges, ids, template.

    ``bos``/``eos``/``unk``/``pad`` ids and the ``add_*_token`` flags are read by :class:`gguf.SpecialVocab` from the
    tokenizer's saved files and the model config, as llama.cpp's converter reads them; ``add_bos``/``add_eos`` are
    then set from what the tokenizer does to a test string (the files do not always say).

    Args:
        writer: a :class:`gguf.GGUFWriter`.
        tokenizer: a fast transformers tokenizer.
        config: the model's transformers config (special token ids when the tokenizer has none).
        n_vocab: embedding rows of the model.
    """
    from gguf import SpecialVocab

    writer.add_tokenizer_model(tokenizer_model(tokenizer))
    writer.add_tokenizer_pre(tokenizer_pre(tokenizer))
    tokens, types = vocabulary(tokenizer, n_vocab)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="lightning-qlora-gguf-vocab-") as folder:
        tokenizer.save_pretrained(folder)
        config.to_json_file(str(Path(folder) / "config.json"))
        special = SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    adds_bos, adds_eos = adds_bos_eos(tokenizer)
    if tokenizer.bos_token_id is not None:
        special.add_special_token["bos"] = adds_bos
    if tokenizer.eos_token_id is not None:
        special.add_special_token["eos"] = adds_eos
    special.add_to_gguf(writer, quiet=True)


def adds_bos_eos(tokenizer: Any) -> tuple[bool, bool]:
    """Whether ``tokenizer`` puts its bos token before, and its eos token after, the text it encodes."""
    plain, full = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a")
    extra = len(full) > len(plain)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return extra and bos is not None and full[0] == bos, extra and eos is not None and full[-1] == eos


def stop_tokens(tokenizer: Any, config: Any) -> list[str]:
    """The texts that end a reply: the eos token(s) of the tokenizer, the model and its generation config."""
    ids: list[int] = []
    for source in (tokenizer, config, getattr(config, "generation_config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids += value if isinstance(value, list) else [] if value is None else [value]
    stops = [tokenizer.convert_ids_to_tokens(i) for i in dict.fromkeys(ids)]
    template = getattr(tokenizer, "chat_template", None) or ""
    stops += [t for t in ("<|im_end|>", "<|eot_id|>", "<|end|>") if t in template]
    return [s for s in dict.fromkeys(stops) if isinstance(s, str) and s]


def _render(tokenizer: Any, messages: list[dict[str, str]], prompt: bool) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    except Exception:  # a template that refuses a role or needs other arguments: no Ollama template then
        return None


def ollama_template(tokenizer: Any) -> tuple[str | None, str | None]:
    """``(TEMPLATE, SYSTEM)`` for an Ollama Modelfile, when the chat template is ChatML or Llama 3's.

    The chat template is rendered with marker messages and compared with ChatML and Llama 3's message layout; a
    default system prompt the template inserts on its own (SmolLM2's) becomes the Modelfile's ``SYSTEM``. Other
    templates give ``(None, None)``: Ollama then derives the template from ``tokenizer.chat_template`` itself.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None, None
    layouts = (  # (Ollama template, one message as the chat template writes it, the reply's opening)
        (_CHATML_TEMPLATE, lambda role, text: f"<|im_start|>{role}\n{text}<|im_end|>\n", "<|im_start|>assistant\n"),
        (
            _LLAMA3_TEMPLATE,
            lambda role, text: f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>",
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
    )
    chat = [{"role": "system", "content": _SYS}, {"role": "user", "content": _USER}]
    full = _render(tokenizer, [*chat, {"role": "assistant", "content": _BOT}, chat[1]], prompt=True)
    alone = _render(tokenizer, chat[1:], prompt=True)
    if full is None or alone is None:
        return None, None
    for template, turn, opening in layouts:
        body = turn("system", _SYS) + turn("user", _USER) + turn("assistant", _BOT) + turn("user", _USER)
        if not full.endswith(body + opening):
            continue
        head = full[: -len(body + opening)]  # a BOS the template writes itself
        if not alone.startswith(head) or not alone.endswith(turn("user", _USER) + opening):
            continue
        middle = alone[len(head) : -len(turn("user", _USER) + opening)]
        found = re.fullmatch(re.escape(turn("system", "\x00")).replace("\x00", "(.*)"), middle, re.S)
        if middle and found is None:
            continue
        if head and head == tokenizer.bos_token and adds_bos_eos(tokenizer)[0]:
            head = ""  # llama.cpp adds it already (add_bos_token): do not write it twice
        return head + template, found.group(1) if found else None
    return None, None


def _quoted(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def ollama_modelfile(tokenizer: Any, config: Any, gguf_name: str) -> str:
    """An Ollama ``Modelfile`` for ``gguf_name`` in the same folder: ``FROM``, ``TEMPLATE``, ``SYSTEM``, stops.

    Args:
        tokenizer: the model's tokenizer (chat template, eos tokens).
        config: the model's transformers config (eos ids).
        gguf_name: the GGUF file's name (``FROM ./<name>``).
    """
    template, system = ollama_template(tokenizer)
    lines = [f"# ollama create <name> -f {MODELFILE_NAME}  (then: ollama run <name>)", f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f"TEMPLATE {_quoted(template)}")
    elif getattr(tokenizer, "chat_template", None):
        lines.append("# no TEMPLATE: Ollama derives it from the chat template stored in the GGUF file")
    else:  # a base model's tokenizer: Ollama then passes the prompt through as it is ({{ .Prompt }})
        lines.append("# no TEMPLATE: the tokenizer has no chat template, so prompts go to the model as they are")
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stop_tokens(tokenizer, config)]
    return "\n".join(lines) + "\n"


__all__ = [
    "MODELFILE_NAME",
    "add_tokenizer",
    "adds_bos_eos",
    "ollama_modelfile",
    "ollama_template",
    "stop_tokens",
    "tokenizer_model",
    "tokenizer_pre",
    "vocabulary",
]
