"""The course's tiny base model and how any model is loaded.

The tiny base is an ordinary Llama-architecture causal LM (about 2 M parameters) with its own byte-level
BPE tokenizer and chat template, pretrained on the generated world by ``python -m utils.pretrain`` and
shipped in ``utils/assets/tiny-llama`` as safetensors. Plain ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load it, so the hub path is the same code with a model id.
"""

from __future__ import annotations

from pathlib import Path

import torch

from utils import env

ASSETS = Path(__file__).resolve().parent / "assets"
BASE_DIR = ASSETS / "tiny-llama"

# Special tokens. Pretraining documents are separated by DOC_TOKEN; the chat tokens never occur in the
# pretraining corpus, so the base model has never seen the instruction format (SFT teaches it).
DOC_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
END_TOKEN = "<|end|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [DOC_TOKEN, PAD_TOKEN, END_TOKEN, *ROLE_TOKENS]

# One turn = role token, a space, content, <|end|>, newline. The space makes an answer tokenize as it does
# in running prose (" Ashfen", one token, not "A" + "shfen"). The generation prompt ends at the role token,
# so the model itself writes that space. The {% generation %} block marks the assistant's tokens, so
# `apply_chat_template(..., return_assistant_tokens_mask=True)` can find them.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ ' ' + message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ ' ' + message['content'] + '<|end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)

TINY_CONFIG = {
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


def base_model_path() -> Path:
    """Directory of the tiny pretrained base (config, safetensors weights, tokenizer, chat template)."""
    if not (BASE_DIR / "model.safetensors").exists():
        raise FileNotFoundError(
            f"The tiny base model is missing from {BASE_DIR}. Rebuild it with `python -m utils.pretrain`."
        )
    return BASE_DIR


def train_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as a transformers fast tokenizer.

    Byte-level means any string can be encoded (no unknown token); the merges are learned from the
    course's corpus, so the world's names and words become one or a few tokens each.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=DOC_TOKEN,
        eos_token=END_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=ROLE_TOKENS,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.padding_side = "right"
    return wrapped


def tiny_config(tokenizer):
    """The tiny base's ``LlamaConfig`` for a tokenizer (vocabulary size and special token ids)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIG,
    )


def _looks_like_hub_id(name: str) -> bool:
    return (
        not Path(name).expanduser().exists() and name.count("/") == 1 and not name.startswith((".", "/", "~"))
    )


def _offline_message(source: str, reason: str) -> str:
    return (
        f"Could not load {source!r} from the Hugging Face hub: this machine cannot reach it "
        f"(offline, or a firewall; {reason}). Use the course's offline model instead: load_model() with no "
        f"argument, or the 'cpu-tiny' profile. Or download the model where there is a network, "
        f"save it with save_pretrained(dir), and pass that directory."
    )


def _in_hub_cache(repo_id: str) -> bool:
    """True when the model's config is already in the local hub cache (loadable offline)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub's endpoint, so that an offline machine is told at once instead of
    after the hub client's minute of retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def load_model(
    name_or_path: str | Path | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs,
):
    """Load ``(model, tokenizer)``: the tiny base by default, or a hub id, or a local directory.

    The model goes to ``device`` (default: ``env.get_device()``) in ``dtype`` (default: ``env.get_dtype``).
    A hub id that cannot be reached explains how to use the offline default instead of a raw traceback.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    env.quiet_library_noise()
    device = torch.device(device) if device is not None else env.get_device()
    dtype = dtype or env.get_dtype(device)
    source = str(base_model_path() if name_or_path is None else name_or_path)
    if name_or_path is not None and not _looks_like_hub_id(source) and not Path(source).expanduser().exists():
        raise FileNotFoundError(f"No model directory at {source!r} (and it is not a hub id like 'org/name').")
    if _looks_like_hub_id(source) and not _in_hub_cache(source) and not _hub_reachable():
        raise ConnectionError(_offline_message(source, "no connection"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as err:
        if _looks_like_hub_id(source):
            raise ConnectionError(_offline_message(source, type(err).__name__)) from None
        raise
    if tokenizer.pad_token is None:  # many hub tokenizers ship without one; batching needs it
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each tied tensor once, as ``model.parameters()`` yields it)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# Where transformers keeps the stack of blocks: BERT, Llama-family, and GPT-2 style models.
LAYER_PATHS = ("bert.encoder.layer", "encoder.layer", "model.layers", "layers", "transformer.h")


def layer_stack(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's stack of transformer blocks (``bert.encoder.layer``, ``model.layers``, ...), also inside a peft
    model; None when there is none at a known path."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model's base
    for path in LAYER_PATHS:
        obj = inner
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    return None
