"""Offline seq2seq material for tests and bench/bench_seq2seq_vs_trainer.py: a parallel corpus built from real
SST-2 sentences, a word-level tokenizer trained on it (the `tokenizers` library), and tiny T5 and BART models built
from configs (random init), saved as Hugging Face folders that `--model hf:FOLDER` loads.

The "translation": a sentence's words in reverse order (`the film is good` -> `good is film the`). Deterministic,
learnable (the decoder must attend to the right source position at each step) and scored by BLEU like any
translation: copying the source scores its unigram matches only.
"""

from __future__ import annotations

import csv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SST2 = ROOT.parent / "shared" / "data" / "sst2"
SPECIALS = ["<pad>", "</s>", "<unk>", "<s>"]  # ids 0..3: pad 0 (T5's decoder start), eos 1


def sst2_sentences(split: str = "train", max_words: int = 12, limit: int | None = None) -> list[str]:
    with (SST2 / f"{split}.tsv").open(encoding="utf-8", newline="") as f:
        rows = [r["sentence"].strip() for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    out = [s for s in rows if 2 <= len(s.split()) <= max_words]
    return out[:limit] if limit else out


def reverse(sentence: str) -> str:
    return " ".join(reversed(sentence.split()))


def write_pairs(path: Path, sentences: list[str], source: str = "source", target: str = "target") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([source, target])
        for s in sentences:
            w.writerow([s, reverse(s)])
    return path


def build_tokenizer(texts: list[str], folder: Path):
    """A lower-casing word-level tokenizer over `texts` (every input ends with </s>), saved to `folder`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                 bos_token="<s>", model_max_length=64)
    hf.save_pretrained(folder)
    return hf


def save_tiny_t5(folder: Path, texts: list[str], d_model: int = 32, layers: int = 2, seed: int = 0,
                 heads: int = 2) -> Path:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tok = build_tokenizer(texts, folder)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tok), d_model=d_model, d_ff=2 * d_model, num_layers=layers, num_heads=heads,
                      d_kv=d_model // heads, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


def save_tiny_bart(folder: Path, texts: list[str], d_model: int = 32, layers: int = 2, seed: int = 0) -> Path:
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    tok = build_tokenizer(texts, folder)
    torch.manual_seed(seed)
    config = BartConfig(vocab_size=len(tok), d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * d_model,
                        decoder_ffn_dim=2 * d_model, max_position_embeddings=64, dropout=0.0, pad_token_id=0,
                        eos_token_id=1, bos_token_id=3, decoder_start_token_id=1, forced_eos_token_id=1)
    BartForConditionalGeneration(config).save_pretrained(folder)
    return folder
