"""Sequence-to-sequence fine-tuning: a text from a text with an encoder-decoder model (T5, BART, mBART, Marian).

Batches are (features {"input_ids", "attention_mask"}, labels [B, T] padded with -100, dataset indices [B])
(data/seq2seq.py). Training: teacher forcing — the decoder reads the labels shifted right (the model's own
`prepare_decoder_input_ids_from_labels`: its decoder start token first) — and the loss is the token-level
cross-entropy over the non-padding labels, with --label-smoothing (0.1 by default, as in the fine-tuning guides).

Evaluation: every validation sample's plain (unsmoothed) teacher-forced loss, its mean over the sample's tokens;
and, by generation (`model.generate` with the model's generation config: --num-beams, --max-new-tokens,
--length-penalty, forced BOS), sacreBLEU, chrF (sacrebleu's corpus scores, 0-100) and ROUGE-L (rouge-score's F1,
x100) against the decoded reference labels (as Hugging Face's translation and summarization examples score). After
each epoch only a fixed, seeded subset of --eval-generate-max validation samples is generated (`eval_subset`,
set by the data stage); the best model's pass over the whole validation and test sets (posthoc.py, inside
`scoring_best()`) generates for every sample.

The default monitor is BLEU on the per-epoch subset (the loss where --eval-generate-max is 0: the data stage sets
`default_monitor`): the teacher-forced validation loss can rise while the generated texts still improve (measured in
docs/seq2seq.md: the loss would have kept an epoch 0.8 BLEU worse); `--metric loss` picks by the loss instead.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .base import Step

IGNORE = -100


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP and torch.compile wrappers (what has `generate`)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def decoder_inputs(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The decoder's teacher-forced input: the labels shifted right, its start token first, -100 as padding."""
    inner = unwrapped(model)
    prepare = getattr(inner, "prepare_decoder_input_ids_from_labels", None)
    if prepare is not None:
        return prepare(labels=labels)
    config = inner.config
    shifted = labels.new_full(labels.shape, config.decoder_start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE, config.pad_token_id)


class TextScores:
    """sacreBLEU, chrF and ROUGE-L over the texts generated in one evaluation pass (the torchmetrics-like
    object evaluation.evaluate drives: to, update, compute)."""

    def __init__(self):
        self.hypotheses: list[str] = []
        self.references: list[str] = []

    def to(self, device) -> TextScores:
        return self

    def update(self, hypotheses: list[str], references: list[str]) -> None:
        self.hypotheses += hypotheses
        self.references += references

    def compute(self) -> dict:
        return scores(self.hypotheses, self.references)


def scores(hypotheses: list[str], references: list[str]) -> dict:
    """{"bleu", "chrf", "rouge_l" (0-100), "generated"}; NaN scores when nothing was generated."""
    n = len(hypotheses)
    if not n:
        return {"bleu": math.nan, "chrf": math.nan, "rouge_l": math.nan, "generated": 0}
    import sacrebleu
    from rouge_score import rouge_scorer

    bleu = sacrebleu.corpus_bleu(hypotheses, [references]).score
    chrf = sacrebleu.corpus_chrf(hypotheses, [references]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = sum(scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)) / n
    return {"bleu": float(bleu), "chrf": float(chrf), "rouge_l": 100.0 * rouge, "generated": n}


class Seq2Seq:
    """Fine-tune an AutoModelForSeq2SeqLM; `tokenizer` (set by the data stage or the loader) decodes."""

    kind = "seq2seq"
    running_metric = "token_accuracy"  # teacher-forced next-token accuracy over the labels, per sample
    headline = ("bleu", "chrf", "rouge_l")
    default_monitor = "bleu"  # see the module docstring
    input_transform = None
    class_weights = None
    decoded_cache = False
    gather_objects = True  # generated texts differ in length: per-sample records (evaluation.evaluate)
    num_outputs = 0

    @classmethod
    def from_options(cls, classes, *, label_smoothing=0.0, **_):
        return cls(label_smoothing)

    def __init__(self, label_smoothing: float = 0.0, tokenizer=None):
        self.label_smoothing = label_smoothing
        self.tokenizer = tokenizer
        self.classes: list[str] = []
        self.eval_subset: set[int] | None = None  # dataset indices generated per epoch; None: every sample
        self.generate_kwargs: dict = {}  # overrides of the model's generation config (predict's flags)

    @contextmanager
    def scoring_best(self):
        """Inside: every sample of an evaluation pass is generated (the best model's validation and test)."""
        subset, self.eval_subset = self.eval_subset, None
        try:
            yield
        finally:
            self.eval_subset = subset

    def prepare(self, batch):
        return batch  # accelerate's loader puts the dict and tensors on the device

    def logits(self, model: nn.Module, features: dict, labels: torch.Tensor) -> torch.Tensor:
        out = model(**features, decoder_input_ids=decoder_inputs(model, labels), use_cache=False)
        return out.logits  # [B, T, V]

    def step(self, model: nn.Module, batch) -> Step:
        features, labels = batch[0], batch[1]
        logits = self.logits(model, features, labels)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                               label_smoothing=self.label_smoothing)
        return Step(loss, len(labels), logits)

    def running(self, outputs: torch.Tensor, batch) -> torch.Tensor:
        labels = batch[1]
        mask = labels != IGNORE
        hit = (outputs.detach().argmax(-1) == labels) & mask
        return (hit.sum(1) / mask.sum(1).clamp_min(1)).sum()

    def generate(self, model: nn.Module, features: dict) -> torch.Tensor:
        return unwrapped(model).generate(**features, **self.generate_kwargs)

    def eval_outputs(self, model: nn.Module, batch):
        """Per sample: {"loss": its mean plain token loss [1], "ids": the generated ids or None}; its label ids."""
        features, labels, indices = batch
        logits = self.logits(model, features, labels)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                              reduction="none").view(labels.shape)
        mask = labels != IGNORE
        per_sample = (nll.sum(1) / mask.sum(1).clamp_min(1)).double()
        chosen = [self.eval_subset is None or int(i) in self.eval_subset for i in indices.tolist()]
        generated: list = [None] * len(chosen)
        if any(chosen):
            pick = torch.tensor(chosen, device=labels.device)
            ids = self.generate(model, {k: v[pick] for k, v in features.items()})
            rows = iter(ids)
            generated = [next(rows) if c else None for c in chosen]
        outputs = [{"loss": per_sample[i:i + 1], "ids": generated[i]} for i in range(len(chosen))]
        return outputs, [labels[i][mask[i]] for i in range(len(labels))]

    def decode(self, ids) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode([[int(x) for x in row] for row in ids],
                                                                skip_special_tokens=True)]

    def metrics(self) -> TextScores:
        return TextScores()

    def update(self, metrics: TextScores, outputs: list[dict], targets: list[torch.Tensor]):
        done = [(o["ids"], t) for o, t in zip(outputs, targets) if o["ids"] is not None]
        if done:
            metrics.update(self.decode([ids for ids, _ in done]), self.decode([t for _, t in done]))
        return sum(o["loss"].sum() for o in outputs), len(targets)

    def summarize(self, computed: dict) -> dict:
        return dict(computed)

    def predict(self, outputs: list[dict], top_k: int = 1) -> list[dict]:
        return [{"generated": text} for text in self.decode([o["ids"] for o in outputs])]
