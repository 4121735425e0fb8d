"""Hugging Face encoder-decoder models for `--task seq2seq`: `hf:<hub id or local folder>` of any model that
transformers' `AutoModelForSeq2SeqLM` loads (T5, BART, mBART, Marian, Pegasus, ...).

The module is transformers' own model, so the saved folder loads with plain transformers
(`AutoModelForSeq2SeqLM.from_pretrained` + `AutoTokenizer.from_pretrained`), generation settings included: the
run's --num-beams, --max-new-tokens, --length-penalty and, for multilingual tokenizers (mBART-50, NLLB, M2M100),
--src-lang/--tgt-lang (the tokenizer's) with the target language's token as `forced_bos_token_id`, are written to
the folder's generation_config.json, which `model.generate` reads by default. The head is `lm_head` (tied to the
shared embeddings in T5 and BART: training the head trains them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from torch import nn

from ..errors import UserError
from . import folder as mf
from .base import Backbone
from .hf_source import HfSource, check_name, load_error, load_pretrained, quiet_transformers, where


@dataclass(frozen=True)
class Seq2SeqOptions:
    """What a seq2seq fit asks of a new model: its weights, and how it generates."""

    pretrained: bool = True
    weights: Path | None = None
    trust_remote_code: bool = False
    spec: str = ""
    num_beams: int = 4
    max_new_tokens: int = 128
    length_penalty: float = 1.0
    src_lang: str | None = None
    tgt_lang: str | None = None


def head_of(module: nn.Module) -> str:
    return "lm_head" if isinstance(getattr(module, "lm_head", None), nn.Module) else \
        type(module).__name__  # no lm_head: the whole model counts as the head (strategies then train it all)


def wrap(module: nn.Module, tokenizer) -> Backbone:
    from .hf_source import blocks_of

    return Backbone(module=module, source="hf-seq2seq", architecture=type(module).__name__, head=head_of(module),
                    preprocessing=None, num_features=int(getattr(module.config, "d_model", 0) or 0),
                    tokenizer=tokenizer, blocks=blocks_of(module))


def set_languages(tokenizer, src_lang: str | None, tgt_lang: str | None, spec: str) -> int | None:
    """--src-lang/--tgt-lang on a multilingual tokenizer; the target language's token id (forced BOS), or None."""
    if src_lang is None and tgt_lang is None:
        return None
    if not hasattr(tokenizer, "src_lang"):
        raise UserError(f"--src-lang/--tgt-lang: the tokenizer of {spec} ({type(tokenizer).__name__}) has no "
                        f"language codes (mBART-50, NLLB and M2M100 tokenizers have)")
    forced = None
    for flag, code in (("--src-lang", src_lang), ("--tgt-lang", tgt_lang)):
        if code is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(code)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise UserError(f"{flag} {code}: not a language code of {spec}'s tokenizer")
        if flag == "--tgt-lang":
            forced = int(token_id)
    if src_lang is not None:
        tokenizer.src_lang = src_lang
    if tgt_lang is not None:
        tokenizer.tgt_lang = tgt_lang
    return forced


def set_generation(module: nn.Module, *, num_beams: int, max_new_tokens: int, length_penalty: float,
                   forced_bos_token_id: int | None = None) -> None:
    """The generation settings every `generate` of this model uses (and its folder's generation_config.json)."""
    gen = module.generation_config
    gen._from_model_config = False  # ours, not derived from config.json: generate() must not rebuild it
    gen.num_beams, gen.max_new_tokens, gen.length_penalty = num_beams, max_new_tokens, length_penalty
    gen.max_length = None  # max_new_tokens decides; a config's old max_length (20, 200) would cut it short
    gen.early_stopping = True if num_beams > 1 else False
    if forced_bos_token_id is not None:
        gen.forced_bos_token_id = forced_bos_token_id
    if gen.decoder_start_token_id is None:
        gen.decoder_start_token_id = module.config.decoder_start_token_id
    for key in ("pad_token_id", "eos_token_id"):
        if getattr(gen, key) is None:
            setattr(gen, key, getattr(module.config, key, None))


class HfSeq2SeqSource(HfSource):
    name: ClassVar[str] = "hf-seq2seq"
    modality: ClassVar[str] = "seq2seq"
    loads_in: ClassVar[str] = ("plain transformers: AutoModelForSeq2SeqLM.from_pretrained(FOLDER) and "
                               "AutoTokenizer.from_pretrained(FOLDER); generate() reads generation_config.json")

    @classmethod
    def check_name(cls, name: str) -> None:
        check_name(name)

    @classmethod
    def create(cls, name: str, num_outputs: int, options: Seq2SeqOptions) -> Backbone:
        from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

        quiet_transformers()
        spec = options.spec or f"hf:{name}"
        at = where(name, spec, "")
        remote = options.trust_remote_code
        try:
            config = AutoConfig.from_pretrained(at, trust_remote_code=remote)
            tokenizer = AutoTokenizer.from_pretrained(at, trust_remote_code=remote)
            if options.pretrained and options.weights is None:
                module = AutoModelForSeq2SeqLM.from_pretrained(at, config=config, trust_remote_code=remote)
            else:
                module = AutoModelForSeq2SeqLM.from_config(config, trust_remote_code=remote)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - hub, file and config errors come in many types
            raise load_error(spec, "sequence-to-sequence generation (AutoModelForSeq2SeqLM)", e) from None
        if tokenizer.pad_token is None:
            raise UserError(f"--model {spec}: its tokenizer has no pad token")
        if module.config.decoder_start_token_id is None and module.generation_config.decoder_start_token_id is None:
            raise UserError(f"--model {spec}: its config has no decoder_start_token_id (the decoder's first token)")
        forced = set_languages(tokenizer, options.src_lang, options.tgt_lang, spec)
        set_generation(module, num_beams=options.num_beams, max_new_tokens=options.max_new_tokens,
                       length_penalty=options.length_penalty, forced_bos_token_id=forced)
        backbone = wrap(module, tokenizer)
        if options.weights is not None:
            from .weights import load_weights, read_state_dict

            load_weights(backbone, read_state_dict(options.weights), f"--weights {options.weights}")
        return backbone

    @classmethod
    def layer_groups(cls, backbone: Backbone):
        """Input to output: the embeddings, each encoder layer, the encoder's final norm, each decoder layer, the
        decoder's rest; the head (lm_head, when it is not tied to the embeddings) last."""
        from .groups import Group, _finish, _span, _split

        module = backbone.module
        body, head = _split(backbone)
        lists = [name for name, m in module.named_modules() if isinstance(m, nn.ModuleList) and len(m)
                 and name.rpartition(".")[0].rpartition(".")[2] in ("encoder", "decoder")]
        groups: list[Group] = []
        run: list[str] = []
        for n in body:
            owner = next((b for b in lists if n.startswith(b + ".")), None)
            if owner is None:
                run.append(n)
                continue
            if run:
                groups.append(Group(_span(run), run))
                run = []
            name = f"{owner}.{n[len(owner) + 1:].split('.', 1)[0]}"
            if groups and groups[-1].name == name:
                groups[-1].params.append(n)
            else:
                groups.append(Group(name, [n]))
        if run:
            groups.append(Group(_span(run), run))
        return _finish(groups, head)

    @classmethod
    def reset_head(cls, backbone: Backbone, num_outputs: int) -> None:
        raise UserError("seq2seq models keep their language-model head (the vocabulary is the output)")

    @classmethod
    def save(cls, folder: Path, backbone: Backbone, classes: list[str], ours: dict) -> None:
        module = getattr(backbone.module, "_orig_mod", backbone.module)
        module.config.finetunekit = ours  # an extra config attribute: saved in config.json, ignored by transformers
        module.save_pretrained(folder)  # safetensors, and generation_config.json
        tokenizer = backbone.tokenizer
        tokenizer.model_max_length = ours["max_length"]  # plain transformers then truncates as we trained
        tokenizer.save_pretrained(folder)

    @classmethod
    def load(cls, folder: Path, config: dict) -> tuple[Backbone, str, list[str]]:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        mf.field(config, "finetunekit.task", folder, str, required=False, default="seq2seq",
                 check=lambda v: v == "seq2seq", expected="seq2seq")
        module = load_pretrained(folder, AutoModelForSeq2SeqLM, "vocab_size")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from None
        ours = config.get("finetunekit") or {}
        set_languages(tokenizer, ours.get("src_lang"), ours.get("tgt_lang"), str(folder))
        backbone = wrap(module, tokenizer)
        module.eval()
        return backbone, "seq2seq", []

    @classmethod
    def load_native(cls, folder: Path) -> nn.Module:
        from transformers import AutoModelForSeq2SeqLM

        quiet_transformers()
        return AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
