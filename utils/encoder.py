"""The course's tiny pretrained encoder (a BERT) for chapter 06: ``python -m utils.encoder``.

A BERT-architecture encoder of well under a million parameters with its own WordPiece tokenizer, pretrained
on the generated corpus (``utils.data``) and shipped in ``utils/assets/tiny-bert`` as safetensors. Plain
``AutoModelForSequenceClassification.from_pretrained(path, num_labels=...)`` loads it: ``model.bert`` is the
pretrained body (embeddings, layers, pooler), ``model.classifier`` the new head.

Pretraining has two objectives, as the original BERT had two:

* **masked-language modelling**: 15 % of the tokens are chosen; 80 % of those become ``[MASK]``, 10 % a
  random token, 10 % stay; the model predicts the originals (cross-entropy on the chosen positions only);
* a **sentence objective for the pooler** (BERT used next-sentence prediction): from the pooled ``[CLS]``
  vector, predict which words the whole (unmasked) text contains, a bag-of-words target (cross-entropy
  against the normalized multi-hot vector). It uses nothing but the text. Without a sentence objective the
  pooler, which ``BertForSequenceClassification`` puts under its classifier, would stay random.

Reproducible (fixed seed, one thread) and sized for a 2-core CPU: a few minutes. The report
(``pretrain_report.json``) holds the held-out masked-token accuracy on ``corpus_valid.txt`` (biographies
never in the training corpus), with the loss curve.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from utils import data, env, train

ENCODER_DIR = Path(__file__).resolve().parent / "assets" / "tiny-bert"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ENCODER_CONFIG = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "max_position_embeddings": 128,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
}
MASK_PROB = 0.15


def encoder_path() -> Path:
    """Directory of the tiny pretrained encoder (config, safetensors weights, tokenizer, report)."""
    if not (ENCODER_DIR / "model.safetensors").exists():
        raise FileNotFoundError(
            f"The tiny encoder is missing from {ENCODER_DIR}. Rebuild it with `python -m utils.encoder`."
        )
    return ENCODER_DIR


def pretrain_report() -> dict:
    """What pretraining measured (``pretrain_report.json``): parameters, steps, seconds, the held-out
    masked-token accuracy ``valid_masked_acc`` and the loss curve."""
    return json.loads((encoder_path() / "pretrain_report.json").read_text())


def train_wordpiece_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A lower-casing WordPiece tokenizer (BERT's kind) for ``texts``, as a transformers fast tokenizer that
    wraps every text as ``[CLS] text [SEP]``.

    The vocabulary is built from the texts, deterministically: the special tokens, every character (as a
    word start and as a ``##`` continuation, the fallback for unseen words), then the most frequent words
    (ties broken alphabetically) up to ``vocab_size``. The ``tokenizers`` library's ``WordPieceTrainer``
    would learn subword pieces too, but it breaks ties between equally frequent merges in hash order, so
    its vocabulary changes from run to run; the course's world has few enough words to keep them whole.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in counts for c in w})
    pieces = chars + [f"##{c}" for c in chars]
    room = max(0, vocab_size - len(SPECIAL_TOKENS) - len(pieces))
    words = [w for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0])) if len(w) > 1][:room]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + pieces + sorted(words))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=ENCODER_CONFIG["max_position_embeddings"],
    )
    wrapped.padding_side = "right"
    return wrapped


def encoder_config(tokenizer, **overrides):
    """The tiny encoder's ``BertConfig`` for a tokenizer (vocabulary size, pad id)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **(ENCODER_CONFIG | overrides)
    )


class Pretrainer(nn.Module):
    """``BertForMaskedLM`` with a pooler and a bag-of-words head on it: the two pretraining objectives.

    Only ``mlm`` (a ``BertForMaskedLM`` whose ``bert`` has its pooler) is saved; the bag-of-words head is
    thrown away after pretraining, as BERT's next-sentence head is.
    """

    def __init__(self, config):
        super().__init__()
        from transformers import BertForMaskedLM
        from transformers.models.bert.modeling_bert import BertPooler

        self.mlm = BertForMaskedLM(config)
        self.mlm.bert.pooler = BertPooler(config)
        self.mlm.bert.pooler.apply(self.mlm._init_weights)
        self.bow = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, input_ids, attention_mask, labels, bow_target):
        out = self.mlm.bert(input_ids=input_ids, attention_mask=attention_mask)
        logits = self.mlm.cls(out.last_hidden_state)
        mlm_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        bow_loss = F.cross_entropy(self.bow(out.pooler_output), bow_target)
        return mlm_loss, bow_loss, logits


def mask_tokens(
    input_ids: torch.Tensor,
    tokenizer,
    generator: torch.Generator,
    special: torch.Tensor,
    prob: float = MASK_PROB,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: (masked inputs, labels with -100 where no prediction is asked).

    ``special`` is a boolean mask of positions never chosen ([CLS], [SEP], padding).
    """
    chosen = (torch.rand(input_ids.shape, generator=generator) < prob) & ~special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    roll = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    random_ids = torch.randint(len(SPECIAL_TOKENS), len(tokenizer), input_ids.shape, generator=generator)
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[swap] = random_ids[swap]
    return masked, labels


def make_batch(rows: list[list[int]], tokenizer, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Pad token lists, mask them, and build the bag-of-words target of each unmasked text."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    attention = (ids != tokenizer.pad_token_id).long()
    special = ids < len(SPECIAL_TOKENS)  # the special tokens have the first ids
    masked, labels = mask_tokens(ids, tokenizer, generator, special)
    bow = torch.zeros(len(rows), len(tokenizer))
    bow.scatter_(1, ids, 1.0)
    bow[:, : len(SPECIAL_TOKENS)] = 0.0
    bow = bow / bow.sum(1, keepdim=True)
    return {"input_ids": masked, "attention_mask": attention, "labels": labels, "bow_target": bow}


@torch.no_grad()
def masked_token_accuracy(model, tokenizer, texts: list[str], seed: int = 0, batch_size: int = 64) -> float:
    """Share of masked positions (BERT's 15 %, seeded) whose original token is the model's top guess.

    ``model``: a ``BertForMaskedLM`` (or a ``Pretrainer``).
    """
    mlm = model.mlm if isinstance(model, Pretrainer) else model
    was_training = mlm.training
    mlm.eval()
    gen = torch.Generator().manual_seed(seed)
    right = total = 0
    rows = [tokenizer(t)["input_ids"] for t in texts]
    for start in range(0, len(rows), batch_size):
        batch = make_batch(rows[start : start + batch_size], tokenizer, gen)
        logits = mlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        asked = batch["labels"] != -100
        right += int((logits.argmax(-1)[asked] == batch["labels"][asked]).sum())
        total += int(asked.sum())
    mlm.train(was_training)
    return right / total


def pretrain(
    out_dir: Path = ENCODER_DIR,
    epochs: int = 8,
    batch_size: int = 32,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    warmup: int = 100,
    seed: int = 0,
    eval_every: int = 200,
    limit: int | None = None,
) -> dict:
    """Pretrain and save the encoder; returns the report. ``limit`` keeps only the first documents of the
    corpus (a quick smoke run; the shipped model uses all of them)."""
    env.seed_everything(seed)
    env.quiet_library_noise()
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)  # the same bits on any machine, no slowdown when others share the cores
    corpus = data.load_corpus("train")
    valid = data.load_corpus("valid")
    tokenizer = train_wordpiece_tokenizer(corpus)
    corpus = corpus[:limit] if limit else corpus
    config = encoder_config(tokenizer)
    model = Pretrainer(config)
    n_params = sum(p.numel() for p in model.mlm.parameters())
    print(f"vocabulary {len(tokenizer)}, encoder parameters {n_params:,}", flush=True)
    docs = [tokenizer(d)["input_ids"] for d in corpus]
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(m, batch):
        mlm_loss, bow_loss, _ = m(**batch)
        return mlm_loss + bow_loss

    def evaluate(m) -> dict:
        return {"valid_masked_acc": masked_token_accuracy(m, tokenizer, valid, seed=seed)}

    def report_progress(entry: dict) -> None:
        acc = (
            f" valid masked-token acc {entry['valid_masked_acc']:.1%}" if "valid_masked_acc" in entry else ""
        )
        print(
            f"epoch {entry['epoch']} step {entry['step']:5d} loss {entry['loss']:.3f}{acc} ({entry['seconds']:.0f} s)",
            flush=True,
        )

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "LayerNorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "LayerNorm" in n]
    start = time.time()
    history = train.train_loop(
        model,
        docs,
        collate_fn=lambda rows: make_batch(rows, tokenizer, gen),
        loss_fn=loss_fn,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        params=[{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        schedule="linear",
        warmup_steps=warmup,
        seed=seed,
        eval_fn=evaluate,
        eval_every=eval_every,
        log_every=eval_every,
        on_log=report_progress,
    )
    seconds = time.time() - start
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.mlm.config.architectures = ["BertForMaskedLM"]
    model.mlm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    report = {
        "parameters": n_params,
        "vocabulary": len(tokenizer),
        "config": ENCODER_CONFIG,
        "objectives": "masked-language modelling (15 %, 80/10/10) + bag-of-words from the pooled [CLS]",
        "epochs": epochs,
        "steps": history[-1]["step"],
        "seconds": round(seconds),
        "torch_threads": torch.get_num_threads(),
        "valid_masked_acc": history[-1]["valid_masked_acc"],
        "valid_texts": "corpus_valid.txt: biographies not in the training corpus",
        "history": history,
    }
    (out_dir / "pretrain_report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def load_classifier(num_labels: int, pretrained: bool = True, seed: int = 0, path: Path | str | None = None):
    """``(model, tokenizer)``: ``BertForSequenceClassification`` on the tiny encoder, with a fresh head.

    ``pretrained=False`` builds the same architecture with random weights (seeded): the baseline that
    says what pretraining is worth.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    env.quiet_library_noise()
    source = Path(path) if path is not None else encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(seed)
    if pretrained:
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels)
    else:
        config = AutoConfig.from_pretrained(source, num_labels=num_labels)
        model = AutoModelForSequenceClassification.from_config(config)
    return model, tokenizer


def classification_examples(tokenizer, rows: list[dict]) -> list[dict]:
    """Rows ``{"text", "label"}`` as examples for ``utils.sft.collate`` (an int label per example)."""
    enc = tokenizer([r["text"] for r in rows])
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": int(r["label"])}
        for ids, mask, r in zip(enc["input_ids"], enc["attention_mask"], rows, strict=True)
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ENCODER_DIR)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    pretrain(args.out, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
