"""The Recipe: one typed schema for every option.

The CLI flags, the YAML recipe file and the Python API all derive from these classes. Each leaf field has
a default and a one-line description; its flag is `--field-name` unless the field names another
(`flag=`). Unknown or misplaced keys and out-of-range values are a `UserError` naming the option.

This module must stay free of torch imports: the CLI validates a recipe before anything heavy loads.
"""

from __future__ import annotations

import os
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from .errors import UserError, did_you_mean


def _opt(default: Any, description: str, flag: str | None = None, **constraints: Any) -> Any:
    extra = {"flag": flag} if flag else None
    return Field(default, description=description, json_schema_extra=extra, **constraints)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class DataConfig(_Section):
    path: Path | None = _opt(
        None, "images: a folder of class folders, a folder with train/ (val/, test/) class folders, "
        "or a CSV manifest with columns path,label; text: a CSV, TSV, JSONL or Parquet table", flag="data")
    val: Path | None = _opt(
        None, "validation folder or CSV; default: val/ beside train/, else a seeded stratified split of the "
        "training data")
    test: Path | None = _opt(None, "test folder or CSV, evaluated once with the best model; default: test/ "
                             "beside train/")
    val_fraction: float = _opt(0.1, "fraction of the training data held out for validation when no "
                               "validation set is given", gt=0, lt=1)
    image_size: int | None = _opt(None, "input size in pixels; default: the model's pretrained size",
                                  ge=16, le=2048)
    augment: Literal["none", "light", "standard", "strong"] = _opt(
        "light", "training augmentation: none; light = random resized crop + horizontal flip; "
        "standard = light + color jitter + RandAugment; strong = standard + random erasing")
    mixup: float | None = _opt(None, "images: MixUp with this alpha (0.2-0.8 are common)", gt=0)
    cutmix: float | None = _opt(None, "images: CutMix with this alpha (1.0 is common); with --mixup, one of "
                                "the two per batch", gt=0)
    mixup_off_epoch: int | None = _opt(None, "images: no MixUp/CutMix from this epoch on (the last epochs "
                                       "see clean images)", ge=1)
    rotate: float = _opt(0.0, "images: random rotation by up to this many degrees, either way (for "
                         "orientation-free data: medical, aerial, microscopy)", ge=0, le=180)
    elastic: float = _opt(0.0, "images: elastic deformation of this strength (torchvision's alpha; 30-50 "
                          "is typical), applied to half the training images", ge=0, le=1000)
    vflip: bool = _opt(False, "images: random vertical flips as well (orientation-free data)")
    tta: Literal["none", "flip", "crops", "flip-crops"] = _opt(
        "none", "images: test-time augmentation at validation, test and predict: flip = average with the "
        "mirrored image; crops = average over the centre and four corner crops (7/8 of the side, resized "
        "back); flip-crops = both")
    cache_features: Literal["auto", "off"] = _opt(
        "auto", "images, linear-probe: compute the frozen backbone's features once (cached on disk, reused by "
        "later runs on the same data and model) and train the head on them; off = run the backbone every epoch")
    cache_views: int | None = _opt(None, "linear probe on cached features with augmentation: K augmented "
                                   "views per image (each epoch, each image uses one of them); default: one "
                                   "unaugmented view", ge=1, le=100)
    cache_images: Literal["auto", "on", "off"] = _opt(
        "auto", "images: decode and resize each training and validation image once into a memory-mapped uint8 "
        "cache on disk (reused by later runs; rebuilt when a file changes); auto = when it pays (2+ epochs or "
        "already cached, and it fits in half the free disk); off = decode the files every epoch")
    target_data: Path | None = _opt(
        None, "images, --domain-adapt: a folder of unlabeled images of the target domain (sub-folders are read too, "
        "their names ignored), read with the training transforms; each training batch is aligned with a batch of "
        "them (docs/domain-adaptation.md)")
    max_bad_fraction: float = _opt(0.05, "stop before training when more than this fraction of the image "
                                   "files or table rows cannot be read", ge=0, le=1)
    num_workers: int | None = _opt(None, "data-loading worker processes; default: from the CPU count "
                                   "(images), 0 (text: batches come from pre-tokenized ids)", ge=0, le=64)
    text_column: str | None = _opt(None, "text: the text column, or two comma-separated columns for sentence "
                                   "pairs (premise,hypothesis); default: detected from common names")
    label_column: str | None = _opt(None, "text and image-multilabel/-regression tables: the label column "
                                    "(multi-label: a column of delimited labels, or several comma-separated 0/1 "
                                    "columns); default: detected")
    label_delimiter: str | None = _opt(None, "multi-label: separator inside the label column; default: the "
                                       "first of | ; , found in it")
    max_length: int | None = _opt(None, "text: tokens per sample after truncation; default: the model's "
                                  "limit, at most 512", ge=8, le=65_536)
    group_by_length: bool = _opt(True, "text: batch training samples of similar length (less padding; "
                                 "batch order stays shuffled)")
    token_delete: float = _opt(0.0, "text augmentation: probability of deleting each token", ge=0, lt=1)
    token_swap: float = _opt(0.0, "text augmentation: probability of swapping each token with the next",
                             ge=0, lt=1)
    token_mask: float = _opt(0.0, "text augmentation: probability of replacing each token with the "
                             "tokenizer's mask token (dynamic masking)", ge=0, lt=1)
    synonyms: Path | None = _opt(None, "text augmentation: a synonym file, one group of interchangeable "
                                 "words per line (comma- or tab-separated)")
    synonym_prob: float = _opt(0.2, "text augmentation: probability of replacing a word that has synonyms",
                               ge=0, le=1)
    source_column: str | None = _opt(None, "seq2seq: the input text column; default: detected from common names "
                                     "(source, src, input, ...)")
    target_column: str | None = _opt(None, "seq2seq: the output text column; default: detected from common names "
                                     "(target, tgt, output, ...)")
    max_target_length: int | None = _opt(None, "seq2seq: target tokens per sample after truncation (the labels); "
                                         "default: --max-length's value", ge=2, le=65_536)


class ModelConfig(_Section):
    name: str | None = _opt(None, "backbone: timm:<name>, torchvision:<name>, hf:<hub id or folder> (text, or "
                            "images with an image task), or a "
                            "built-in offline one: efficientnet_lite0 (images, the default), minilm (text, the "
                            "default), fasterrcnn_efficientnet_lite0 (--task detection, the default; or "
                            "torchvision:fasterrcnn_resnet50_fpn and the other torchvision Faster R-CNNs)", flag="model", min_length=1)
    weights: Path | None = _opt(None, "initial weights (.safetensors, or a weights-only .pt/.pth/.bin state "
                                "dict) instead of the source's pretrained weights")
    pretrained: bool = _opt(True, "start from the source's pretrained weights (off: random init)")
    init: Path | None = _opt(None, "two-stage transfer: start from an earlier run's fine-tuned weights (its run "
                             "folder or model folder; same task, its --model is taken); its head is kept when the "
                             "class names match in order, else a new head (docs/two-stage.md)")
    head: str = _opt("linear", "images: the new head: linear, or mlp:N (Dropout, Linear N, GELU, Dropout, "
                     "Linear)", min_length=1)
    dropout: float | None = _opt(None, "dropout before the classifier (timm's drop_rate; transformers' "
                                 "classifier_dropout or the config's equivalent), or inside the MLP head", ge=0, lt=1)
    drop_path: float | None = _opt(None, "images: stochastic depth rate (timm's drop_path_rate, torchvision's "
                                   "stochastic_depth_prob) for models that have it", ge=0, lt=1)
    prune: float = _opt(0.0, "images (CNNs): structured pruning: remove this fraction of the channels of each "
                        "backbone layer group (torch-pruning, group magnitude importance; the head's outputs kept) "
                        "before training, so the run's epochs fine-tune the smaller model to recover (0 = off)",
                        ge=0, lt=1)
    trust_remote_code: bool = _opt(False, "hf: allow a hub model to run its own Python code (off: refuse)")
    peft: Literal["lora", "dora", "ia3", "prompt"] | None = _opt(
        None, "parameter-efficient fine-tuning (the peft library): the pretrained weights stay frozen and small "
        "added parameters train with the new head; lora = low-rank adapters, dora = weight-decomposed LoRA (timm, "
        "torchvision, transformers), ia3 = learned rescaling of keys, values and feed-forward activations "
        "(transformers text encoders), prompt = trainable tokens prepended to the input (transformers text encoders; timm ViTs: "
        "visual prompt tuning); the model folder keeps the adapter alone (docs/peft.md)")
    lora_r: int = _opt(8, "--peft lora/dora: the rank of each adapter", ge=1, le=4096)
    lora_alpha: float | None = _opt(None, "--peft lora/dora: the scaling numerator (updates scale by alpha / r); "
                                    "default: 2 x --lora-r", gt=0)
    lora_dropout: float = _opt(0.0, "--peft lora/dora: dropout on each adapter's input", ge=0, lt=1)
    lora_targets: str | None = _opt(None, "--peft lora/dora/ia3: the modules that get adapters, comma-separated "
                                    "names or name suffixes (qkv,fc1,fc2); default: discovered from the "
                                    "architecture (attention and MLP linears of transformers, qkv/fc1/fc2 of timm "
                                    "ViTs, the convolutions of CNNs), the head never")
    prompt_tokens: int = _opt(10, "--peft prompt: how many trainable tokens are prepended", ge=1, le=1000)
    anchor_sizes: str | None = _opt(None, "detection: anchor sizes in pixels, comma-separated: one per feature "
                                    "level (the built-in has 4, ResNet-50 FPN 5, MobileNet FPN 3), or sizes "
                                    "every level uses; default: the model's own (32,64,128,256 for the built-in)")
    aspect_ratios: str | None = _opt(None, "detection: anchor aspect ratios (height/width), comma-separated, at "
                                     "every level; default 0.5,1,2")
    anchors: Literal["model", "auto"] = _opt(
        "model", "detection: model = the model's anchors (or --anchor-sizes/--aspect-ratios); auto = sizes "
        "(one per feature level) and 3 aspect ratios by k-means over the training boxes at the detector's scale, "
        "kept only when they cover more boxes at IoU 0.7 than the model's own (printed and recorded)")
    hard_examples: int = _opt(0, "detection: online hard-example mining: of the RoIs sampled per image (512), "
                              "only the K with the highest loss train the box head (0 = off: all of them)",
                              ge=0, lt=512)
    nms_threshold: float = _opt(0.5, "detection: IoU above which non-maximum suppression drops the lower-scoring "
                                "of two boxes of a class (0.3 for crowded small objects)", gt=0, le=1)
    score_threshold: float = _opt(0.05, "detection: detections scoring below this are dropped (at validation "
                                  "and predict)", ge=0, lt=1)
    detections_per_image: int = _opt(100, "detection: at most this many detections per image", ge=1, le=10_000)
    min_size: int | None = _opt(None, "detection: images are resized so their shorter side is this many pixels; "
                                "default: the model's (512 for the built-in, 800 for torchvision's)", ge=32, le=4096)
    max_size: int | None = _opt(None, "detection: ... and their longer side at most this many; default: the "
                                "model's (853 for the built-in, 1333 for torchvision's)", ge=32, le=8192)
    trainable_layers: int | None = _opt(None, "detection: backbone stages that train, from the top (0 = the "
                                        "backbone frozen); default 3, as torchvision's", ge=0, le=8)
    num_beams: int = _opt(4, "seq2seq: beam search width when generating (1 = greedy); saved in the model folder's "
                          "generation_config.json", ge=1, le=64)
    max_new_tokens: int = _opt(128, "seq2seq: at most this many generated tokens per text (saved with the model)",
                               ge=1, le=65_536)
    length_penalty: float = _opt(1.0, "seq2seq: beam search's length penalty (> 1 favours longer outputs, < 1 "
                                 "shorter; saved with the model)", ge=-10, le=10)
    src_lang: str | None = _opt(None, "seq2seq, mBART/NLLB-style multilingual tokenizers: the source language code "
                                "(en_XX); saved with the tokenizer")
    tgt_lang: str | None = _opt(None, "seq2seq, multilingual tokenizers: the target language code (ro_RO); its token "
                                "is also the forced first generated token (forced_bos_token_id) where the tokenizer "
                                "has it")


class TrainConfig(_Section):
    strategy: Literal["auto", "full", "linear-probe", "freeze-unfreeze", "gradual", "lp-ft", "bitfit",
                      "norm-head"] = _opt(
        "auto", "what trains: auto = chosen from the data (linear-probe for up to 200 images a class near the "
        "model's resolution, lp-ft up to 1,000, else full; full for upscaled images and for text; the log "
        "says why); full = every parameter; linear-probe = the new head only; freeze-unfreeze = the "
        "head for --head-epochs at 10x lr, then all; lp-ft = a linear probe for --head-epochs (default half "
        "the run), then all; gradual = the head, then one more layer group every --unfreeze-every epochs; "
        "bitfit = biases + head; norm-head = norm layers + head; with --peft, \"all\" is the adapters + head, and "
        "auto = full (the adapters and the head from the first epoch)")
    head_epochs: int | None = _opt(None, "freeze-unfreeze and lp-ft: epochs that train the head alone; "
                                   "default 1 (freeze-unfreeze), half the run (lp-ft)", ge=1)
    unfreeze_every: int = _opt(1, "gradual: epochs between unfreezing one more layer group", ge=1)
    freeze: str | None = _opt(None, "parameters kept frozen, by name: comma-separated globs "
                              "('patch_embed*,pos_embed'; see `finetunekit inspect`)")
    freeze_types: str | None = _opt(None, "layer types kept frozen: comma-separated of norm, embedding, conv, "
                                    "linear")
    layer_decay: float | None = _opt(None, "layer-wise lr decay: group i of n (input to output) learns at "
                                     "lr x decay^(n-1-i); 0.75 is common for ViTs", gt=0, le=1)
    head_lr_mult: float = _opt(1.0, "the head learns at lr x this (discriminative learning rate)", gt=0, le=1000)
    epochs: int | None = _opt(None, "training epochs; default: 10 for images, 3 for text", ge=1, le=100_000)
    batch_size: Annotated[int, Field(ge=1, le=65_536)] | Literal["auto"] = _opt(
        32, "samples per step on one device (before accumulation); auto = the largest of 32 (detection: 8) x "
        "grad-accum, half that, ... whose forward and backward pass fit in memory, with --grad-accum raised to "
        "keep the effective batch")
    lr: float | None = _opt(None, "peak learning rate; default per batch of 64, scaled linearly with the "
                            "effective batch: images 1e-3 full, 1e-2 linear-probe, bitfit and norm-head; "
                            "text 2e-4 full, 2e-3 linear-probe, 1e-3 bitfit and norm-head; head-only phases "
                            "of the staged strategies run at 10x; with --peft, 10x the full rate (images 1e-2, "
                            "text 2e-3) in every phase", gt=0, le=10)
    weight_decay: float = _opt(0.05, "AdamW weight decay (never applied to norms, biases, embeddings)",
                               ge=0, le=10)
    optimizer: Literal["adamw", "adam", "sgd", "nesterov", "rmsprop", "lamb", "lars"] = _opt(
        "adamw", "optimizer: sgd = momentum SGD, nesterov = SGD with Nesterov momentum; the SGD family's "
        "default lr is 10x the Adam family's, LARS's 10x SGD's (its trust ratio scales each step by 0.001; the "
        "new head, norms and biases train by plain momentum SGD)")
    momentum: float = _opt(0.9, "momentum of sgd, nesterov, rmsprop and lars", ge=0, lt=1)
    scheduler: Literal["auto", "cosine", "linear", "step", "onecycle", "cosine-restarts", "plateau",
                       "constant"] = _opt(
        "auto", "learning rate after warmup: auto = cosine for images, linear for text; step = x0.1 after each "
        "third of the run; onecycle = 30% warmup then cosine to lr/1e4; cosine-restarts = cycles of "
        "--restart-epochs; plateau = x0.1 after 2 epochs without improvement; constant")
    restart_epochs: float | None = _opt(None, "cosine-restarts: epochs per cycle; default: a third of the run",
                                        gt=0)
    warmup: float | None = _opt(None, "linear learning-rate warmup, in epochs (fractions allowed); default: "
                                "1 epoch for images (20% of runs under 5 epochs), 10% of the run for text, 30% for "
                                "onecycle", ge=0)
    min_lr_ratio: float | None = _opt(None, "final learning rate of the schedule, as a fraction of lr; "
                                      "default: 0.01 (cosine), 0 (linear)", ge=0, le=1)
    freeze_layers: int | None = _opt(None, "freeze the embeddings and the first N encoder layers (models "
                                     "that list their layers: transformers encoders)", ge=0)
    loss: Literal["auto", "ce", "focal", "bce", "mse", "l1", "huber"] = _opt(
        "auto", "auto = ce (classification), bce (multi-label), mse (regression); focal for imbalanced "
        "classes; l1 or huber for regression with outliers")
    l1_penalty: float = _opt(0.0, "adds this times the sum of |w| over the head's weight matrices to the "
                             "loss (sparse heads; Keras' kernel_regularizer=l1)", ge=0)
    focal_gamma: float = _opt(2.0, "focusing parameter of the focal loss", ge=0, le=10)
    class_weights: str | None = _opt(None, "weight the loss per class: auto = inverse class frequency "
                                     "(normalised to mean 1), or one comma-separated number per class")
    label_smoothing: float = _opt(0.1, "label smoothing of the cross-entropy loss", ge=0, lt=1)
    threshold: float = _opt(0.5, "multi-label: probability above which a label is predicted", gt=0, lt=1)
    grad_accum: int = _opt(1, "gradient accumulation steps (effective batch = batch-size x grad-accum)",
                           ge=1, le=4096)
    clip_grad: float | None = _opt(1.0, "clip the gradient norm to this value ('none' to disable)", gt=0)
    precision: Literal["auto", "no", "bf16", "fp16"] = _opt(
        "auto", "mixed precision: auto = bf16 on GPUs that support it, else fp16 on GPUs; on the CPU bf16 for "
        "transformers (not CNNs) where it has AVX512-BF16 or AMX, else off (FINETUNEKIT_CPU_BF16=1 or 0 forces "
        "it; measured in docs/speed.md)")
    early_stopping: int | None = _opt(None, "stop after this many epochs without improvement of the "
                                      "validation metric", ge=1)
    ema: float | None = _opt(None, "keep an exponential moving average of the weights with this decay "
                             "(0.99-0.9999); it is evaluated every epoch and saved when it scores better", gt=0, lt=1)
    early_stopping_delta: float = _opt(0.0, "early stopping: the smallest change of the metric that counts as "
                                       "an improvement", ge=0)
    metric: Literal["auto", "accuracy", "macro_f1", "micro_f1", "map", "map50", "mar", "mae", "rmse", "r2",
                    "spearman", "bleu", "chrf", "rouge_l", "loss"] = _opt(
        "auto", "validation metric that picks the best checkpoint and drives early stopping; auto = "
        "accuracy (classification), micro_f1 (multi-label), rmse (regression), map50 (detection: mAP at IoU "
        "0.5; map = mAP@[.5:.95], mar = mean recall at 100 detections), bleu (seq2seq: over the texts generated for "
        "the --eval-generate-max subset; chrf, rouge_l likewise; loss = the teacher-forced token loss over the whole "
        "validation set, the default when --eval-generate-max is 0)")
    eval_generate_max: int = _opt(200, "seq2seq: after each epoch, generate for at most this many validation "
                                  "samples (per process) to score BLEU, chrF and ROUGE-L (the loss covers them all); "
                                  "the best model is scored on the whole validation and test sets (0 = no "
                                  "generation per epoch)", ge=0)
    checkpoint_every: str = _opt("30m", "write a resumable checkpoint every N updates (500), every so long "
                                 "(10m, 90s, 1h), or only after each epoch (epoch); one is also written after "
                                 "each epoch and on SIGTERM/SIGINT")
    keep_checkpoints: int = _opt(2, "complete checkpoints kept besides the best one (older ones are removed "
                                 "once a newer one is complete)", ge=2, le=1000)
    max_nonfinite: int = _opt(10, "stop after this many updates in a row skipped for a non-finite loss or "
                              "gradient", ge=1)
    calibration: bool = _opt(True, "after training, fit a temperature on the validation set so that predicted "
                             "probabilities match accuracy (model/calibration.json; predict, evaluate and exports "
                             "apply it; classification and multi-label; docs/calibration.md)")
    seed: int = _opt(0, "random seed (data split, init, order, augmentation)", ge=0, le=2**32 - 1)
    cpu: bool = _opt(False, "train on the CPU even when a GPU is present")
    processes: int | None = _opt(None, "train in N processes on this machine, one per GPU (or N CPU processes "
                                 "with --cpu), started by torch's elastic launcher as `torchrun --nproc_per_node N` "
                                 "would; the global batch is N x batch-size x grad-accum (docs/distributed.md)",
                                 ge=1, le=1024)
    sync_bn: bool = _opt(False, "with several processes, turn BatchNorm layers into SyncBatchNorm: statistics over "
                         "the global batch instead of each process's share (CNNs; GPUs only: torch's SyncBatchNorm "
                         "has no CPU kernel)")
    fsdp: bool = _opt(False, "with several processes, shard the model, its gradients and optimizer state across "
                      "them with torch's FSDP2 (each process holds about 1/N of the parameters): for models that do "
                      "not fit one device; GPUs through accelerate's FSDP plugin, CPU processes (gloo) through "
                      "fully_shard; one process: no effect (docs/distributed.md)")
    grad_checkpointing: bool = _opt(False, "recompute each block's activations in the backward pass instead of "
                                    "keeping them: less memory, about a third more compute (timm and "
                                    "transformers models)")
    qat: bool = _opt(False, "quantization-aware training (torchao): fine-tune through int8 fake quantization of "
                     "the Linear layers, then write the int8 model beside the model folder and report its "
                     "validation score next to the fp32 weights' (transformer encoders, not CNNs; docs/export.md)")
    max_accuracy_drop: float = _opt(1.0, "--qat: warn when the int8 model's validation accuracy is more than this "
                                    "many points below the fp32 weights'", ge=0, le=100)
    merge: bool = _opt(False, "--peft lora/dora/ia3: after training, also fold the adapters into the weights and "
                       "write an ordinary model folder (RUN/merged) that plain timm/torchvision/transformers loads")
    compile: bool = _opt(False, "torch.compile the model (the first batches are slower while it compiles); "
                         "if compiling fails, the log says why and training goes on without it")
    teacher: str | None = _opt(None, "knowledge distillation from this teacher: a finished finetunekit run "
                               "directory or model folder, or hf:<folder> of a classification model, with the "
                               "same classes (classification and multi-label tasks; docs/distillation.md)",
                               min_length=1)
    kd_alpha: float = _opt(0.5, "--teacher: the loss is (1 - alpha) x the task's loss + alpha x the "
                           "distillation loss", ge=0, le=1)
    kd_temperature: float = _opt(4.0, "--teacher: softmax temperature T of the soft loss, KL(teacher || student) "
                                 "at T, scaled by T^2 (multi-label: per label, on sigmoids)", gt=0, le=100)
    kd_hard: bool = _opt(False, "--teacher: hard-label distillation instead: cross-entropy on the teacher's "
                         "top class (multi-label: BCE on its labels at --threshold)")
    domain_adapt: Literal["none", "coral", "mmd"] = _opt(
        "none", "images: align the backbone's features (the head's input) of each training batch with those of a "
        "batch of --target-data images: coral = Deep CORAL, ||C_s - C_t||_F^2 / (4 d^2) of the two covariances; mmd = "
        "squared maximum mean discrepancy, Gaussian kernels at 5 bandwidths around the median distance "
        "(docs/domain-adaptation.md)")
    da_weight: float = _opt(1.0, "--domain-adapt: the loss is the task's loss + this x the CORAL or MMD loss", ge=0,
                            le=1e6)
    kd_cache: Literal["auto", "off"] = _opt(
        "auto", "--teacher: auto = compute the teacher's logits once and reuse them every epoch (cached on disk) "
        "when the student's inputs are the same every epoch (no augmentation, or cached features); off = run "
        "the teacher on every training batch")


# What each task reads and which losses and validation metrics fit it (the first loss is the default).
TASKS = {
    "image-classification": ("image", ("ce", "focal"), ("accuracy", "macro_f1", "loss")),
    "image-multilabel": ("image", ("bce", "focal"), ("micro_f1", "macro_f1", "map", "loss")),
    "image-regression": ("image", ("mse", "l1", "huber"), ("rmse", "mae", "r2", "spearman", "loss")),
    "text-classification": ("text", ("ce", "focal"), ("accuracy", "macro_f1", "loss")),
    "text-multilabel": ("text", ("bce", "focal"), ("micro_f1", "macro_f1", "map", "loss")),
    "text-regression": ("text", ("mse", "l1", "huber"), ("rmse", "mae", "r2", "spearman", "loss")),
    "detection": ("image", ("rcnn",), ("map50", "map", "mar", "loss")),
    "seq2seq": ("text", ("ce",), ("loss", "bleu", "chrf", "rouge_l")),
}
# the head and targets each task needs (tasks.TASKS's classes say the same: tests/test_registries.py)
TASK_KIND = {"image-classification": "classification", "image-multilabel": "multilabel",
             "image-regression": "regression", "text-classification": "classification",
             "text-multilabel": "multilabel", "text-regression": "regression", "detection": "detection",
             "seq2seq": "seq2seq"}
DEFAULT_MODEL = {"image": "efficientnet_lite0", "text": "minilm", "detection": "fasterrcnn_efficientnet_lite0",
                 "seq2seq": "hf:t5-small"}
# what --model accepts: <prefix>:<name>, or a built-in name (models.registry maps each onto its adapter)
MODEL_PREFIXES = ("timm", "torchvision", "hf")
BUILTIN_MODELS = {"efficientnet_lite0": "image", "minilm": "text", "fasterrcnn_efficientnet_lite0": "image"}


class Recipe(_Section):
    """Everything a fine-tuning run needs. `Recipe(**dict)`, `Recipe.load(yaml)`, or flags."""

    task: Literal["image-classification", "image-multilabel", "image-regression", "text-classification",
                  "text-multilabel", "text-regression", "detection", "seq2seq"] = _opt(
        "image-classification", "what to learn (detection: boxes; Pascal VOC, COCO or YOLO data; seq2seq: a text "
        "from a text with an encoder-decoder model: T5, BART, mBART, Marian; docs/seq2seq.md)")
    description: str = _opt("", "one line on what this recipe is for (shown by `finetunekit recipes`)")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    out: Path | None = _opt(None, "run directory; default: runs/<model>-<date>-<time>")
    overwrite: bool = _opt(False, "replace an existing run directory at --out")
    resume: str | None = _opt(None, "continue an interrupted run from its latest complete checkpoint: a run "
                              "directory, or auto (the run at --out if it has a checkpoint, else a new run)")
    resume_force: bool = _opt(False, "resume even though the data or the recipe changed (what cannot be kept "
                              "is named and dropped)")
    quiet: bool = _opt(False, "no progress bars, log lines only")
    verbose: bool = _opt(False, "also show the detail lines (cache keys, memory layout, timings of each stage) and "
                         "the libraries' own warnings (transformers, timm, torch, accelerate); log.txt holds them "
                         "either way")
    log_with: str = _opt("tensorboard", "experiment trackers that get the recipe (as dotted params) and each epoch's "
                         "metrics: tensorboard (in RUN/), mlflow, wandb, or none; comma-separated for several "
                         "(tensorboard,mlflow); MLflow and W&B read their usual environment variables "
                         "(MLFLOW_TRACKING_URI, WANDB_MODE=offline, ...: docs/tracking.md)", min_length=1)
    # the YAML file this recipe was read from, if any (a run must not write over it: see rundir.check_out)
    _config_path: Path | None = PrivateAttr(None)

    @field_validator("log_with")
    @classmethod
    def _trackers(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",")]
        for name in names:
            if name not in TRACKERS:
                raise ValueError(f"expected a comma-separated list of {', '.join(TRACKERS)}"
                                 f"{did_you_mean(name, TRACKERS)}")
        if "none" in names and len(names) > 1:
            raise ValueError("expected 'none' alone")
        return ",".join(names)

    @property
    def trackers(self) -> list[str]:
        """The --log-with trackers, 'none' dropped: ['tensorboard'], ['tensorboard', 'mlflow'], []."""
        return [n for n in self.log_with.split(",") if n != "none"]

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
        """Read a YAML recipe; `overrides` ({'train.epochs': 3} or nested) win over the file. Relative paths in
        the file are relative to the file's folder (PATH_KEYS); those in `overrides` stay as given."""
        recipe = build_recipe(relative_to(read_yaml(path), Path(path).parent), overrides or {}, source=str(path))
        recipe._config_path = Path(path)
        return recipe

    @property
    def config_path(self) -> Path | None:
        return self._config_path

    def __eq__(self, other: object) -> bool:  # the same options, wherever they were read from
        return isinstance(other, Recipe) and self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]  (mutable, like every pydantic model)

    @property
    def modality(self) -> str:
        return TASKS[self.task][0]

    @property
    def model_name(self) -> str:
        return self.model.name or DEFAULT_MODEL.get(self.task) or DEFAULT_MODEL[self.modality]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


SECTIONS: dict[str, type[_Section]] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
TRACKERS = ("tensorboard", "mlflow", "wandb", "none")  # --log-with (tracking.py: the pip extra of each)

# The options that name files or folders. In a YAML recipe a relative one is relative to the recipe file's
# folder (`relative_to`); on the command line, to the current directory. `train.teacher` also takes hf:<folder>.
PATH_KEYS = ("data.path", "data.val", "data.test", "data.synonyms", "data.target_data", "model.weights", "model.init",
             "train.teacher", "out", "resume")

# `fit --help` by topic: (title, keys). Every leaf option is in exactly one group (tests/test_config_cli.py).
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("task and data", ("task", "description", "data.path", "data.val", "data.test", "data.val_fraction",
                       "data.label_column", "data.label_delimiter", "data.max_bad_fraction", "data.num_workers")),
    ("model", ("model.name", "model.weights", "model.init", "model.pretrained", "model.head", "model.dropout",
               "model.drop_path", "model.prune", "model.trust_remote_code")),
    ("what trains", ("train.strategy", "train.head_epochs", "train.unfreeze_every", "train.freeze",
                     "train.freeze_types", "train.freeze_layers", "train.layer_decay", "train.head_lr_mult")),
    ("training", ("train.epochs", "train.batch_size", "train.grad_accum", "train.lr", "train.optimizer",
                  "train.momentum", "train.weight_decay", "train.scheduler", "train.warmup", "train.min_lr_ratio",
                  "train.restart_epochs", "train.clip_grad", "train.metric", "train.early_stopping",
                  "train.early_stopping_delta", "train.ema", "train.seed", "train.calibration")),
    ("loss", ("train.loss", "train.label_smoothing", "train.class_weights", "train.focal_gamma", "train.threshold",
              "train.l1_penalty")),
    ("images", ("data.image_size", "data.augment", "data.mixup", "data.cutmix", "data.mixup_off_epoch",
                "data.rotate", "data.elastic", "data.vflip", "data.tta", "data.cache_images", "data.cache_features",
                "data.cache_views")),
    ("text", ("data.text_column", "data.max_length", "data.group_by_length", "data.token_delete", "data.token_swap",
              "data.token_mask", "data.synonyms", "data.synonym_prob")),
    ("detection", ("model.anchor_sizes", "model.aspect_ratios", "model.anchors", "model.hard_examples",
                   "model.nms_threshold", "model.score_threshold", "model.detections_per_image", "model.min_size",
                   "model.max_size", "model.trainable_layers")),
    ("sequence-to-sequence", ("data.source_column", "data.target_column", "data.max_target_length",
                              "model.num_beams", "model.max_new_tokens", "model.length_penalty", "model.src_lang",
                              "model.tgt_lang", "train.eval_generate_max")),
    ("parameter-efficient fine-tuning", ("model.peft", "model.lora_r", "model.lora_alpha", "model.lora_dropout",
                                         "model.lora_targets", "model.prompt_tokens", "train.merge")),
    ("distillation", ("train.teacher", "train.kd_alpha", "train.kd_temperature", "train.kd_hard",
                      "train.kd_cache")),
    ("domain adaptation", ("data.target_data", "train.domain_adapt", "train.da_weight")),
    ("devices, precision and memory", ("train.cpu", "train.precision", "train.processes", "train.sync_bn",
                                       "train.fsdp",
                                       "train.grad_checkpointing", "train.compile", "train.qat",
                                       "train.max_accuracy_drop")),
    ("run directory, checkpoints and output", ("out", "overwrite", "resume", "resume_force", "train.checkpoint_every",
                                               "train.keep_checkpoints", "train.max_nonfinite", "log_with", "quiet",
                                               "verbose")),
)


def relative_to(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A recipe file's values with its relative paths (PATH_KEYS) made relative to `folder`, the file's folder:
    `data: {path: ../data/x}` in recipes/r.yaml names recipes/../data/x wherever the command runs."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for key in PATH_KEYS:
        section, _, leaf = key.rpartition(".")
        holder = out.get(section) if section else out
        if not isinstance(holder, dict) or not isinstance(holder.get(leaf), str):
            continue
        value = holder[leaf]
        prefix = "hf:" if key == "train.teacher" and value.startswith("hf:") else ""
        rest = value[len(prefix):]
        if not rest or rest.lower() in ("none", "null", "auto") or ":" in rest or Path(rest).expanduser().is_absolute():
            continue  # unset, a tracker-style name (timm:x), or absolute
        holder[leaf] = prefix + os.path.normpath(folder / rest)
    return out


def absolute_paths(recipe: Recipe) -> Recipe:
    """`recipe` with its relative paths made absolute (against the current directory): what a run writes as its
    recipe.yaml (and a search as best.yaml), so the file names the same files wherever it is read from."""
    cwd = Path.cwd()
    data = relative_to(recipe.model_dump(mode="json"), cwd)
    absolute = Recipe.model_validate(data)
    absolute._config_path = recipe.config_path
    return absolute


def leaf_fields() -> list[tuple[str, str, Any]]:
    """(dotted key, flag, FieldInfo) for every leaf option, in schema order."""
    out = []
    for name, info in Recipe.model_fields.items():
        if name in SECTIONS:
            for sub, sub_info in SECTIONS[name].model_fields.items():
                out.append((f"{name}.{sub}", _flag(sub, sub_info), sub_info))
        else:
            out.append((name, _flag(name, info), info))
    return out


def _flag(name: str, info: Any) -> str:
    extra = info.json_schema_extra or {}
    return "--" + (extra.get("flag") or name).replace("_", "-")


class _Alias(yaml.YAMLError):
    def __init__(self, event):
        super().__init__(event.anchor)
        self.anchor, self.line = event.anchor, event.start_mark.line + 1


class _RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load without aliases (`*name`, merge keys `<<: *name` included): nine nested aliases of
    nine items make a file of a few hundred bytes a billion values (billion laughs), cheap as shared references but not
    to walk, print or validate. A recipe writes its values out."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _Alias(self.peek_event())
        return super().compose_node(parent, index)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {p}: no such recipe file")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_RecipeLoader)
    except _Alias as e:
        raise UserError(f"{p}, line {e.line}: YAML aliases (*{e.anchor}) are not allowed in a recipe; write the "
                        f"value out") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{p}: not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: a recipe must be a mapping of options, got {type(data).__name__}")
    return data


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if "." in key:
            section, sub = key.split(".", 1)
            nested.setdefault(section, {})[sub] = value
        else:
            nested[key] = value
    return nested


def build_recipe(base: dict[str, Any], overrides: dict[str, Any], source: str = "recipe",
                 override_names: dict[str, str] | None = None) -> Recipe:
    """Merge `overrides` (dotted or nested keys) over `base` and validate.

    Errors name the flag for overridden keys (`override_names`: dotted key -> flag) and
    `source: key` for keys from the file.
    """
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in _nest(overrides).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    _check_keys(merged, source)
    try:
        return Recipe.model_validate(merged)
    except ValidationError as e:
        raise UserError(_one_line(e, source, set(flatten(overrides)), override_names or {})) from None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested recipe keys as dotted ones: {"train": {"lr": 1}} -> {"train.lr": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and (prefix or k in SECTIONS):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_keys(merged: dict[str, Any], source: str) -> None:
    """Unknown or misplaced keys, with a did-you-mean over every valid dotted key."""
    valid = [key for key, _, _ in leaf_fields()]
    for key, value in merged.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise UserError(f"{source}: '{key}' must be a mapping of options, got {short(value)}")
            for sub in value:
                dotted = f"{key}.{sub}"
                if dotted not in valid:
                    raise UserError(f"{source}: unknown option '{dotted}'{_suggest(sub, dotted, valid)}")
        elif key not in Recipe.model_fields:
            raise UserError(f"{source}: unknown option '{key}'{_suggest(key, key, valid)}")


def _suggest(leaf: str, dotted: str, valid: list[str]) -> str:
    placed = [v for v in valid if v.rsplit(".", 1)[-1] == leaf]
    if placed:
        return f" (did you mean {placed[0]!r}?)"
    hint = did_you_mean(dotted, valid)
    return hint or did_you_mean(leaf, [v.rsplit(".", 1)[-1] for v in valid])


def _one_line(err: ValidationError, source: str, overridden: set[str],
              override_names: dict[str, str]) -> str:
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "lax-", "json-")))
    # pydantic reports `int | None` failures per branch: keep the key, drop the branch names
    key = ".".join(p for p in key.split(".") if p not in {"int", "float", "none", "str", "path", "constrained-int",
                                                          "bool", "literal['none']", "literal['auto']"})
    where = override_names.get(key, key) if key in overridden else f"{source}: {key}"
    msg = e["msg"].replace("Input should be", "expected").replace("Value error, ", "")
    for words, sign in (("greater than or equal to", ">="), ("less than or equal to", "<="),
                        ("greater than", ">"), ("less than", "<")):
        msg = msg.replace(f"expected {words}", f"expected a value {sign}")
    given = e.get("input")
    hint = ""
    expected = (e.get("ctx") or {}).get("expected")
    if e["type"] == "literal_error" and isinstance(given, str) and len(given) <= _SHORT and expected:
        hint = did_you_mean(given, [s.strip(" '") for s in expected.replace(" or ", ",").split(",")])
    return f"{where}: {msg}, got {short(given)}{hint}"


_SHORT = 80  # characters of a value quoted in an error message
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = _SHORT
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8
_repr.maxlevel = 3


def short(value: Any) -> str:
    """repr(value) for an error message: at most about _SHORT characters, whatever the value's size (reprlib
    reads only what it prints)."""
    text = _repr.repr(value)
    return text if len(text) <= _SHORT else text[:_SHORT - 3] + "..."
