"""Exercise checkers: call the learner's function, compare with the reference, say what differs.

Every checker behaves the same way:

* not attempted (the function still raises ``NotImplementedError``): a friendly line, no exception,
  returns ``None``, so the notebook runs on;
* wrong: says what differs (type, shape, scale, which case) without giving the answer, returns ``False``;
* right: says so, returns ``True``.

A checker never raises on the learner's behalf: an exception inside the learner's code is reported as
a message naming the exception, so a class can run the whole notebook top to bottom.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any


class CheckFailed(Exception):
    """Raised inside a checker body to report what is wrong (the message is shown to the learner)."""


def run_check(name: str, fn: Callable, body: Callable[[Callable], Any]) -> bool | None:
    """Run ``body(fn)``, which raises ``CheckFailed`` with a hint when ``fn`` is wrong.

    Returns True (passed), False (wrong) or None (not attempted yet).
    """
    try:
        body(fn)
    except NotImplementedError:
        print(
            f"[{name}] not attempted yet: fill in the function above, run its cell, then run this cell again."
        )
        return None
    except CheckFailed as err:
        print(f"[{name}] not yet right: {err}")
        return False
    except Exception as err:  # the learner's code crashed: report it, keep the notebook running
        where = traceback.extract_tb(err.__traceback__)[-1]
        print(
            f"[{name}] your function raised {type(err).__name__}: {err} (line {where.lineno} of {where.name})."
        )
        return False
    print(f"[{name}] correct.")
    return True


def count_llama_params_reference(config) -> int:
    """Parameters of a ``LlamaForCausalLM`` from its config (no biases, RMSNorm weights only).

    Per layer: attention q, o: d*d; k, v: d * (n_kv_heads * head_dim); MLP gate, up, down: 3 * d * d_ff;
    two RMSNorms: 2 * d. Plus the embedding V * d, the final norm d, and an LM head V * d unless tied.
    """
    d, d_ff, vocab, layers = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
        config.num_hidden_layers,
    )
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * d_ff + 2 * d
    lm_head = 0 if config.tie_word_embeddings else vocab * d
    return vocab * d + layers * per_layer + d + lm_head


def _param_count_cases():
    from transformers import LlamaConfig

    return [
        LlamaConfig(
            vocab_size=100,
            hidden_size=16,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=True,
        ),
        LlamaConfig(
            vocab_size=120,
            hidden_size=24,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        ),
        LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=80,
            num_hidden_layers=1,
            num_attention_heads=8,
            num_key_value_heads=8,
            tie_word_embeddings=False,
        ),
    ]


def check_param_count(count_fn: Callable) -> bool | None:
    """Check a learner's ``count_fn(config) -> int`` against ``sum(p.numel())`` of real Llama models."""
    import torch
    from transformers import LlamaForCausalLM

    def body(fn):
        for i, config in enumerate(_param_count_cases()):
            with torch.device("meta"):
                truth = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
            got = fn(config)
            if not isinstance(got, int):
                raise CheckFailed(f"return an int (a count), not {type(got).__name__}.")
            if got == truth:
                continue
            diff = got - truth
            d, vocab = config.hidden_size, config.vocab_size
            hint = (
                f"case {i + 1} (tie_word_embeddings={config.tie_word_embeddings}, "
                f"num_key_value_heads={config.num_key_value_heads} of {config.num_attention_heads} heads): "
                f"you count {got:,}, the model has {truth:,} ({diff:+,})."
            )
            if abs(diff) == vocab * d:
                hint += " The difference is exactly vocab_size * hidden_size: look at tie_word_embeddings."
            elif abs(diff) % d == 0 and abs(diff) // d <= 2 * config.num_hidden_layers + 1:
                hint += (
                    " The difference is a few multiples of hidden_size: look at the normalization weights."
                )
            elif config.num_key_value_heads != config.num_attention_heads:
                hint += " This model uses grouped-query attention: how wide are k_proj and v_proj?"
            raise CheckFailed(hint)

    return run_check("count the parameters", count_fn, body)


# Chapter 03: LoRA's forward pass, its parameter count, and the best rank-k approximation.


def check_lora_forward(lora_forward: Callable) -> bool | None:
    """Check ``lora_forward(x, W, A, B, alpha, rank) -> h`` against ``x W^T + (alpha / rank) x A^T B^T``.

    Shapes: ``x`` (..., d_in), ``W`` (d_out, d_in), ``A`` (rank, d_in), ``B`` (d_out, rank); ``h`` (..., d_out).
    """
    import torch

    def reference(x, W, A, B, alpha, rank):
        return x @ W.T + (alpha / rank) * (x @ A.T) @ B.T

    def body(fn):
        gen = torch.Generator().manual_seed(0)
        for i, (lead, d_in, d_out, rank, alpha) in enumerate([((4,), 12, 8, 2, 4), ((2, 3), 10, 6, 3, 1.5)]):
            x = torch.randn(*lead, d_in, generator=gen)
            W, A = torch.randn(d_out, d_in, generator=gen), torch.randn(rank, d_in, generator=gen)
            B = torch.randn(d_out, rank, generator=gen)
            got = fn(x, W, A, B, alpha, rank)
            if not isinstance(got, torch.Tensor):
                raise CheckFailed(f"return a tensor, not {type(got).__name__}.")
            want = reference(x, W, A, B, alpha, rank)
            if got.shape != want.shape:
                raise CheckFailed(
                    f"case {i + 1}: x is {tuple(x.shape)}, so h should be {tuple(want.shape)}; "
                    f"yours is {tuple(got.shape)}."
                )
            if torch.allclose(got, want, atol=1e-5, rtol=1e-5):
                continue
            base = x @ W.T
            for scale, what in [
                (1.0, "no scaling at all"),
                (alpha, "alpha without dividing by rank"),
                (rank / alpha, "rank / alpha, upside down"),
                (0.0, "no update at all"),
            ]:
                if torch.allclose(got, base + scale * (x @ A.T) @ B.T, atol=1e-5, rtol=1e-5):
                    raise CheckFailed(
                        f"case {i + 1}: the base part is right but the update is scaled by {what}."
                    )
            update = want - base
            if not torch.allclose(got - update, base, atol=1e-5, rtol=1e-5):
                raise CheckFailed(
                    f"case {i + 1}: the frozen part differs from W x: W is (d_out, d_in), so a row "
                    "vector x maps to x @ W.T (or F.linear(x, W))."
                )
            raise CheckFailed(
                f"case {i + 1}: the frozen part is right, the update is not (alpha / r) B A x: x meets "
                "A first, then B."
            )
        zero_B = torch.zeros(6, 2)
        x, W, A = (
            torch.randn(3, 5, generator=gen),
            torch.randn(6, 5, generator=gen),
            torch.randn(2, 5, generator=gen),
        )
        if not torch.allclose(fn(x, W, A, zero_B, 4, 2), x @ W.T, atol=1e-6):
            raise CheckFailed("with B = 0 the layer must equal the base layer exactly.")

    return run_check("LoRA forward", lora_forward, body)


def _lora_count_cases():
    from transformers import LlamaConfig

    def cfg(**kw):
        return LlamaConfig(vocab_size=100, **kw)

    return [
        (cfg(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
         4, ["q_proj", "v_proj"]),
        (cfg(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2),
         8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
        (cfg(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1),
         2, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ]  # fmt: skip


def check_lora_count(count_fn: Callable) -> bool | None:
    """Check ``count_fn(config, rank, target_modules) -> int`` (Llama family, a list of names) against
    ``utils.counting.count_lora_params``, which tests/test_counting.py checks against peft."""
    from utils import counting

    def body(fn):
        for i, (config, rank, targets) in enumerate(_lora_count_cases()):
            got = fn(config, rank, list(targets))
            if not isinstance(got, int):
                raise CheckFailed(f"return an int (a count), not {type(got).__name__}.")
            want = counting.count_lora_params(config, rank, targets)
            if got == want:
                continue
            layers = counting.lora_targets(config, targets)
            hint = (
                f"case {i + 1} (rank {rank}, targets {targets}, {config.num_key_value_heads} of "
                f"{config.num_attention_heads} heads for k/v): you count {got:,}, peft adds {want:,}."
            )
            if got == sum(s.d_in * s.d_out for s in layers):
                hint += (
                    " That is the size of the full weights: LoRA adds A (r x d_in) and B (d_out x r) instead."
                )
            elif got * config.num_hidden_layers == want:
                hint += " That is one layer's worth: every decoder layer has its own adapters."
            elif config.num_key_value_heads != config.num_attention_heads and any(
                t in targets for t in ("k_proj", "v_proj")
            ):
                hint += " k_proj and v_proj output num_key_value_heads * head_dim features, not hidden_size."
            elif "gate_proj" in targets:
                hint += " The MLP's gate and up map hidden_size -> intermediate_size, down maps it back."
            raise CheckFailed(hint)

    return run_check("count LoRA parameters", count_fn, body)


def check_rank_k_approx(approx_fn: Callable) -> bool | None:
    """Check ``approx_fn(M, k) -> M_k``, the best rank-k approximation of ``M`` (Eckart-Young)."""
    import torch

    def body(fn):
        gen = torch.Generator().manual_seed(0)
        for i, (m, n, k) in enumerate([(12, 8, 3), (6, 10, 1), (9, 9, 9)]):
            M = torch.randn(m, n, generator=gen, dtype=torch.float64)
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
            want = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k, :]
            got = fn(M, k)
            if not isinstance(got, torch.Tensor):
                raise CheckFailed(f"return a tensor, not {type(got).__name__}.")
            if got.shape != M.shape:
                raise CheckFailed(
                    f"case {i + 1}: M is {tuple(M.shape)} and so must its approximation be; yours is "
                    f"{tuple(got.shape)}. Which index of U and of Vh runs over the k components?"
                )
            if torch.allclose(got.to(M.dtype), want, atol=1e-6):
                continue
            if torch.allclose(got.to(M.dtype), U[:, :k] @ Vh[:k, :], atol=1e-6):
                raise CheckFailed(f"case {i + 1}: the right vectors, but the singular values are missing.")
            if int(torch.linalg.matrix_rank(got.to(M.dtype))) > k:
                raise CheckFailed(f"case {i + 1}: your matrix has rank above k = {k}.")
            raise CheckFailed(
                f"case {i + 1}: rank k, but not the closest rank-k matrix: keep the k largest "
                "singular values and their vectors."
            )

    return run_check("best rank-k approximation", approx_fn, body)


# Chapter 04: peft in practice.


def _tiny_bert_classifier(num_hidden_layers: int):
    """A randomly initialized BERT sequence classifier small enough to build in milliseconds."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        intermediate_size=32,
    )
    return BertForSequenceClassification(config)


def check_trainable_count(count_fn: Callable) -> bool | None:
    """Check ``count_fn(model) -> (trainable, total)`` against peft's ``get_nb_trainable_parameters()``
    on small peft models (a tied embedding, GQA, a classification head kept as ``modules_to_save``)."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def models():
        torch.manual_seed(0)
        llama = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=64,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=True,
            )
        )
        bert = _tiny_bert_classifier(num_hidden_layers=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield "tied Llama", get_peft_model(llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
            yield (
                "BERT classifier",
                get_peft_model(bert, LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS")),
            )

    def body(fn):
        for name, model in models():
            got, want = fn(model), model.get_nb_trainable_parameters()
            if not (isinstance(got, tuple) and len(got) == 2):
                raise CheckFailed("return a pair (trainable, total).")
            if tuple(got) == want:
                continue
            hint = f"{name}: you count {tuple(got)}, peft counts {want}."
            with_dupes = sum(t.numel() for t in model.state_dict().values())
            if got[1] == with_dupes and with_dupes != want[1]:
                hint += " A tied tensor is one parameter that appears under two names: count it once."
            elif got[0] == got[1]:
                hint += " Trainable means requires_grad is True."
            raise CheckFailed(hint)

    return run_check("count trainable parameters", count_fn, body)


def check_seq_cls_lora_config(make_config: Callable) -> bool | None:
    """Check ``make_config() -> LoraConfig`` for a BERT classifier: LoRA on query and value, the new
    classification head trained in full, everything else frozen."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model

    def body(fn):
        config = fn()
        if not isinstance(config, LoraConfig):
            raise CheckFailed(f"return a peft LoraConfig, not {type(config).__name__}.")
        torch.manual_seed(0)
        bert = _tiny_bert_classifier(num_hidden_layers=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(bert, config)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        if not any("classifier" in n for n in trainable):
            raise CheckFailed(
                "the classifier stays frozen, so it keeps its random init: tell peft the task "
                "(task_type) or list the head in modules_to_save."
            )
        lora_on = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_A." in n}
        if lora_on != {"query", "value"}:
            raise CheckFailed(
                f"LoRA is on {sorted(lora_on) or 'nothing'}; the exercise asks for query and value."
            )
        others = [n for n in trainable if "lora_" not in n and "classifier" not in n]
        if others:
            raise CheckFailed(f"more than LoRA and the head is trained, e.g. {others[0]}.")
        if str(config.task_type) not in ("SEQ_CLS", "TaskType.SEQ_CLS"):
            raise CheckFailed(
                "set task_type='SEQ_CLS': peft then wraps the model for classification and saves the head."
            )

    return run_check("LoRA config for a classifier", make_config, body)


# ---------------------------------------------------------------------------------------------------------
# Chapter 01: label masking, the shifted loss, packing.


def labels_from_ids_reference(input_ids: list[int], assistant_id: int, end_id: int) -> list[int]:
    """Labels for a rendered conversation: keep each assistant answer (the tokens after an
    ``<|assistant|>`` token, up to and including its ``<|end|>``), -100 everywhere else."""
    labels, inside = [], False
    for token in input_ids:
        labels.append(token if inside else -100)
        if token == assistant_id:
            inside = True
        elif token == end_id:
            inside = False
    return labels


def _conversation_cases(tokenizer) -> list[list[int]]:
    cases = [
        [
            {"role": "user", "content": "Where does Zusa Wensor live?"},
            {"role": "assistant", "content": "Ashfen"},
        ],
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is 3 plus 4?"},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "And 5 plus 5?"},
            {"role": "assistant", "content": "It is 10"},
        ],
    ]
    return [tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"] for c in cases]


def check_labels_from_ids(labels_fn: Callable, tokenizer) -> bool | None:
    """Check ``labels_fn(input_ids, assistant_id, end_id) -> labels`` on single- and multi-turn chats."""
    assistant_id = tokenizer.convert_tokens_to_ids("<|assistant|>")
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")

    def body(fn):
        for i, ids in enumerate(_conversation_cases(tokenizer)):
            want = labels_from_ids_reference(ids, assistant_id, end_id)
            got = list(fn(list(ids), assistant_id, end_id))
            name = ["a one-turn chat", "a two-turn chat with a system message"][i]
            if len(got) != len(want):
                raise CheckFailed(
                    f"{name}: labels need one entry per token ({len(want)}), you return {len(got)}."
                )
            if got == want:
                continue
            kept, kept_want = sum(t != -100 for t in got), sum(t != -100 for t in want)
            if any(g != -100 and g != t for g, t in zip(got, ids, strict=True)):
                raise CheckFailed(f"{name}: a kept label must equal the token id at that position.")
            if assistant_id in [g for g in got if g != -100]:
                raise CheckFailed(f"{name}: you keep the <|assistant|> token itself; the prompt supplies it.")
            if end_id not in [g for g in got if g != -100]:
                raise CheckFailed(
                    f"{name}: the <|end|> token after an answer is masked; how would the model learn to stop?"
                )
            raise CheckFailed(
                f"{name}: you keep {kept} tokens, the answer(s) have {kept_want}; is every turn covered?"
            )

    return run_check("labels from token ids", labels_fn, body)


def check_causal_lm_loss(loss_fn: Callable, model, batch: dict) -> bool | None:
    """Check ``loss_fn(logits, labels) -> scalar`` against the model's own loss (tolerance 1e-6)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits, batch["labels"]

    def body(fn):
        got = fn(logits, labels)
        if not torch.is_tensor(got) or got.dim() != 0:
            raise CheckFailed(
                "return a scalar tensor (the mean loss), not "
                + (
                    f"a tensor of shape {tuple(got.shape)}."
                    if torch.is_tensor(got)
                    else type(got).__name__ + "."
                )
            )
        if torch.isclose(got, out.loss, atol=1e-6, rtol=0):
            return
        flat = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        if torch.isclose(got, flat, atol=1e-6, rtol=0):
            raise CheckFailed(
                "your loss pairs the logits at position t with the label at t: which token should they predict?"
            )
        summed = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
        )
        if torch.isclose(got, summed, rtol=1e-5):
            raise CheckFailed(
                "that is the sum over tokens; the model reports the mean over the unmasked targets."
            )
        raise CheckFailed(
            f"you get {got.item():.6f}, the model's loss is {out.loss.item():.6f}. Are -100 labels ignored?"
        )

    return run_check("shifted cross-entropy", loss_fn, body)


def check_pack(pack_fn: Callable, examples: list[dict], block_size: int = 64) -> bool | None:
    """Check ``pack_fn(examples, block_size) -> rows`` against ``utils.sft.pack_examples``."""
    from utils.sft import pack_examples

    want = pack_examples(examples, block_size)

    def body(fn):
        got = fn(examples, block_size)
        if not isinstance(got, list) or not got or not isinstance(got[0], dict):
            raise CheckFailed(
                "return a list of rows, each a dict with input_ids, labels, position_ids, seq_lengths."
            )
        for key in ("input_ids", "labels", "position_ids", "seq_lengths"):
            if key not in got[0]:
                raise CheckFailed(f"a row has no {key!r}.")
        if any(len(r["input_ids"]) > block_size for r in got):
            raise CheckFailed(f"a row is longer than block_size={block_size}.")
        if sum(len(r["input_ids"]) for r in got) != sum(len(e["input_ids"]) for e in examples):
            raise CheckFailed("the rows do not hold every token of every example exactly once.")
        if any(sum(r["seq_lengths"]) != len(r["input_ids"]) for r in got):
            raise CheckFailed(
                "seq_lengths of a row must add up to its length (an example never spans two rows)."
            )
        for r in got:
            start = 0
            for n in r["seq_lengths"]:
                if r["position_ids"][start : start + n] != list(range(n)):
                    raise CheckFailed("position_ids must restart at 0 for each example, as if it were alone.")
                start += n
        if len(got) != len(want):
            raise CheckFailed(f"you use {len(got)} rows, first-fit in order needs {len(want)}.")

    return run_check("pack examples", pack_fn, body)
