"""A fine-tuned seq2seq model restored from disk (`finetunekit.load` of a `--task seq2seq` run): `generate` and
`predict` texts, and the labelled loader `evaluate` scores (loss, BLEU, chrF, ROUGE-L over every pair).

Generation uses the model folder's generation_config.json (what the run saved: --num-beams, --max-new-tokens,
--length-penalty, forced BOS); `num_beams=`, `max_new_tokens=`, `length_penalty=` override it per call, as
`predict --num-beams` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .inference import TextModel
from .models import Backbone
from .predictor import check_batch_size


class Seq2SeqModel(TextModel):
    def __init__(self, backbone: Backbone, task, folder: Path, config: dict):
        super().__init__(backbone, task, folder, config, "seq2seq")
        self.text_columns = [config.get("source_column") or "source"]
        self.label_columns = [config.get("target_column") or "target"]
        self.max_target_length = int(config.get("max_target_length") or self.max_length)
        task.tokenizer = backbone.tokenizer  # its languages (--src-lang/--tgt-lang) set by the source's load

    @staticmethod
    def overrides(num_beams: int | None = None, max_new_tokens: int | None = None,
                  length_penalty: float | None = None) -> dict[str, Any]:
        from .errors import UserError

        for flag, value in (("--num-beams", num_beams), ("--max-new-tokens", max_new_tokens)):
            if value is not None and value < 1:
                raise UserError(f"{flag} {value}: expected an integer >= 1")
        given = {"num_beams": num_beams, "max_new_tokens": max_new_tokens, "length_penalty": length_penalty}
        return {k: v for k, v in given.items() if v is not None}

    @torch.inference_mode()
    def generate(self, texts: Sequence[str], batch_size: int = 64, **overrides: Any) -> list[str]:
        """The generated text of each source text, in input order (batches formed by length: least padding)."""
        check_batch_size(batch_size)
        self.module.eval()
        kwargs = self.overrides(**overrides)
        tok = self.tokenizer
        enc = tok(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(enc[i]))
        out: list[str] = [""] * len(texts)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tok.pad({"input_ids": [enc[i] for i in idx]}, return_tensors="pt")
            ids = self.module.generate(**{k: v.to(self.device) for k, v in batch.items()}, **kwargs)
            for i, text in zip(idx, tok.batch_decode(ids, skip_special_tokens=True)):
                out[i] = text.strip()
        return out

    def predict(self, inputs: Any, batch_size: int = 64, top_k: int = 1, errors: str = "raise",
                uncertainty: bool = False, mc_dropout: int = 0, ood_score: str | None = None,
                **overrides: Any) -> list[dict]:
        """One {"text": source, "generated": output} per input (a string, a list of them, or a .txt/table file
        with the model's source column)."""
        from .errors import UserError

        if uncertainty or mc_dropout or ood_score:
            raise UserError("--uncertainty: for single-label classification models, not seq2seq")
        texts, extras = self._inputs(inputs)
        made = self.generate([t[0] for t in texts], batch_size, **overrides)
        return [{**e, "generated": g} for e, g in zip(extras, made)]

    def labelled_loader(self, data: Path, batch_size: int) -> tuple[DataLoader, int]:
        check_batch_size(batch_size)
        from .data.seq2seq import Seq2SeqCollate, Seq2SeqDataset, read_pairs
        from .data.text import make_text_loader

        split, skipped = read_pairs(data, self.text_columns[0], self.label_columns[0])
        ds = Seq2SeqDataset(split, self.tokenizer, self.max_length, self.max_target_length)
        return make_text_loader(ds, batch_size, train=False, group_by_length=False, seed=0,
                                collate=Seq2SeqCollate(self.tokenizer.pad_token_id)), len(skipped)
