"""Token attributions for text models: integrated gradients (captum's `LayerIntegratedGradients`) over the
output of a Hugging Face encoder's word-embedding layer (`get_input_embeddings()`).

The baseline is the same token sequence with every token but the special ones ([CLS], [SEP]) replaced by
[PAD] ([MASK] where the tokenizer has no PAD), so position and segment embeddings are the input's and the
special tokens' attributions are exactly 0. The attributed value is the target's logit (softmax and sigmoid
are monotone in it), so by completeness the attributions add up to logit(text) - logit(baseline), up to
captum's convergence delta (the integral's error with `steps` Gauss-Legendre points). Word pieces are summed
into the words of a fast tokenizer's word ids (a slow tokenizer: its tokens).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

METHODS = ("integrated-gradients",)
DEFAULT_STEPS = 50  # captum's default n_steps
_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class TextExplanation:
    words: list[tuple[str, float]]  # (word, attribution) in text order
    spaces: list[bool]  # whether whitespace (or the start of a text) came before each word
    target: Any  # targets.Target
    logit: float  # the target's logit for the text
    baseline_logit: float  # ... and for the baseline
    delta: float  # captum's convergence delta: sum(attributions) - (logit - baseline_logit)
    steps: int


def require() -> None:
    """A one-line UserError when captum is missing."""
    try:
        import captum  # noqa: F401
    except ImportError:
        raise UserError("explain: text explanations need captum (pip install 'finetunekit[explain]')") from None


def check_steps(steps: int) -> None:
    if steps < 1:
        raise UserError(f"--steps {steps}: expected an integer >= 1")


def _texts(model, text: Any) -> tuple[str, ...]:
    texts = (text,) if isinstance(text, str) else tuple(text)
    if len(texts) != len(model.text_columns) or not all(isinstance(t, str) for t in texts):
        raise UserError(f"explain: this model reads {len(model.text_columns)} text(s) per sample "
                        f"({', '.join(model.text_columns)}), got {text!r}")
    return texts


def attribute(model, text: Any, target: str | None = None, steps: int = DEFAULT_STEPS) -> TextExplanation:
    """Integrated gradients of one text (or a sentence pair) for `target` (module docstring)."""
    require()
    check_steps(steps)
    import torch
    from captum.attr import LayerIntegratedGradients

    from . import targets

    targets.check_task(model)
    targets.check_target(model, target)
    texts = _texts(model, text)
    tokenizer, module = model.tokenizer, model.module
    enc = tokenizer(*texts, truncation=True, max_length=model.max_length, return_tensors="pt",
                    return_special_tokens_mask=True, return_offsets_mapping=tokenizer.is_fast)
    keys = [k for k in _KEYS if k in enc]
    inputs = [enc[k].to(model.device) for k in keys]
    special = enc["special_tokens_mask"][0].bool()
    fill = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.mask_token_id
    if fill is None:
        raise UserError("explain: the model's tokenizer has neither a PAD nor a MASK token for the baseline")
    baseline = torch.where(special, enc["input_ids"][0], torch.tensor(fill)).unsqueeze(0).to(model.device)

    def forward(input_ids, *rest):
        return module(input_ids=input_ids, **dict(zip(keys[1:], rest))).logits.float()

    module.eval()
    with torch.no_grad():
        logits = forward(*inputs)[0].cpu()
        base_logits = forward(baseline, *inputs[1:])[0].cpu()
    chosen = targets.resolve(model, logits, target)
    ig = LayerIntegratedGradients(forward, module.get_input_embeddings())
    with torch.enable_grad():
        attributions, delta = ig.attribute(inputs[0], baselines=baseline, additional_forward_args=tuple(inputs[1:]),
                                           target=chosen.index, n_steps=steps, return_convergence_delta=True)
    module.zero_grad(set_to_none=True)
    per_token = attributions.sum(-1)[0].detach().double().cpu()  # [T]
    words, spaces = _words(enc, texts, per_token, special, tokenizer)
    return TextExplanation(words, spaces, chosen, float(logits[chosen.index]), float(base_logits[chosen.index]),
                           float(delta[0]), steps)


def _words(enc, texts: tuple[str, ...], per_token, special, tokenizer) -> tuple[list[tuple[str, float]], list[bool]]:
    """Token attributions summed per word (a fast tokenizer's word ids and offsets), special tokens left out;
    and whether each word had whitespace (or a text's start) before it."""
    if not tokenizer.is_fast:
        pieces = [(p, float(a)) for p, a, s in zip(tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist()),
                                                   per_token, special) if not s]
        return pieces, [True] * len(pieces)
    word_ids, sequence_ids = enc.word_ids(0), enc.sequence_ids(0)
    offsets = enc["offset_mapping"][0].tolist()
    spans: dict[tuple[int, int], list] = {}  # (sequence, word) -> [start, end, attribution]
    for i, (w, seq) in enumerate(zip(word_ids, sequence_ids)):
        if w is None or bool(special[i]):
            continue
        start, end = offsets[i]
        span = spans.setdefault((seq, w), [start, end, 0.0])
        span[0], span[1] = min(span[0], start), max(span[1], end)
        span[2] += float(per_token[i])
    words = [(texts[seq][s:e], a) for (seq, _), (s, e, a) in spans.items()]
    spaces = [s == 0 or texts[seq][s - 1].isspace() for (seq, _), (s, _, _) in spans.items()]
    return words, spaces


def summary(words: list[tuple[str, float]], k: int = 3) -> str:
    """The k words of largest |attribution|: "'funny' +0.41, 'gripping' +0.30, ',' -0.22"."""
    top = sorted(words, key=lambda w: -abs(w[1]))[:k]
    return ", ".join(f"{w!r} {a:+.2f}" for w, a in top)


_NO_SPACE_BEFORE = set(".,!?;:)]}%'\"")
_NO_SPACE_AFTER = set("([{")


def render_html(attributions: list[tuple[str, float]], caption: str = "", spaces: list[bool] | None = None) -> str:
    """A self-contained HTML page (no scripts, fonts, images or links): each word shaded green (it raises
    the target's score) or red (it lowers it), opacity by |attribution| / the largest, the value on hover.
    `spaces`: whether a space goes before each word (TextExplanation.spaces); default: before every word but
    closing punctuation and after an opening bracket."""
    peak = max((abs(a) for _, a in attributions), default=0.0) or 1.0
    parts, previous = [], ""
    for i, (word, a) in enumerate(attributions):
        space = spaces[i] if spaces is not None else not (word[:1] in _NO_SPACE_BEFORE or
                                                           previous[-1:] in _NO_SPACE_AFTER)
        if parts and space:
            parts.append(" ")
        rgb = "0,150,60" if a >= 0 else "210,40,40"
        parts.append(f'<span style="background:rgba({rgb},{abs(a) / peak * 0.85:.3f})" '
                     f'title="{a:+.4f}">{html.escape(word)}</span>')
        previous = word
    cap = f"<p class=caption>{html.escape(caption)}</p>\n" if caption else ""
    return ("<!DOCTYPE html>\n<html><head><meta charset=utf-8><title>finetunekit explain</title>\n"
            "<style>body{font-family:sans-serif;margin:2em;max-width:60em}"
            ".text{font-size:1.3em;line-height:2}.text span{padding:0.1em 0.15em;border-radius:0.2em}"
            ".caption,.legend{color:#444}</style></head><body>\n" + cap +
            f"<p class=text>{''.join(parts)}</p>\n"
            '<p class=legend><span style="background:rgba(0,150,60,0.6)">green</span> raises the score, '
            '<span style="background:rgba(210,40,40,0.6)">red</span> lowers it; hover a word for its '
            "attribution.</p>\n</body></html>\n")


def caption_of(explanation: TextExplanation) -> str:
    """One line for the page: the prediction, what was attributed, and the completeness check."""
    e = explanation
    total = sum(a for _, a in e.words)
    return (f"{e.target.describe()}. Integrated gradients ({e.steps} steps) of its logit: {e.logit:+.4f} for "
            f"this text, {e.baseline_logit:+.4f} for the [PAD] baseline; the attributions add up to {total:+.4f} "
            f"(convergence delta {e.delta:+.1e}).")
