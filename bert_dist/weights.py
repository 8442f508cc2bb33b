"""Model weights as data (safetensors + config.json + tokenizer.json), and Hugging Face BERT import and export.

A bert-dist output directory and a Hugging Face BERT directory share one layout (config.json with
Google/HF field names, model.safetensors, a tokenizer), so `--init` reads both the same way.
Hugging Face keys map onto ours by prefix alone (our modules keep HF names); older TF-converted
checkpoints (LayerNorm gamma/beta) are renamed on the way in. Export (`export_hf`) is the same weights
under the same keys, plus the config and tokenizer files transformers' Auto classes look for.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import pickle
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn

from bert_dist.config import BertConfig
from bert_dist.model import BertForPreTraining, BertForQuestionAnswering, BertForSequenceClassification
from bert_dist.tokenizer import check_special_tokens, find_tokenizer_file, load_tokenizer, save_tokenizer

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# save_pretrained's sharded form: an index naming each tensor's shard file.
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
ENCODER_PREFIXES = ("embeddings.", "encoder.", "pooler.")
# Tied to the word embeddings (or to cls.predictions.bias): never stored twice.
TIED_KEYS = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
HUB_CONFIG_FILES = ["config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json"]
HUB_WEIGHTS = (["model.safetensors"], [SHARD_INDEXES[0], "model-*-of-*.safetensors"], ["pytorch_model.bin"],
               [SHARD_INDEXES[1], "pytorch_model-*-of-*.bin"])
"""The forms of a hub model's weights, in the order they are preferred (the order `load_state_dict` reads them)."""
HUB_FILES = HUB_CONFIG_FILES + [p for form in HUB_WEIGHTS for p in form]


def hub_patterns(repo_files: list[str]) -> list[str]:
    """What to download of a hub repo holding `repo_files`: its config and tokenizer files and ONE form of its
    weights (bert-base-uncased has model.safetensors and pytorch_model.bin, 440 MB each, plus TF and Flax copies)."""
    for form in HUB_WEIGHTS:
        if any(fnmatch.fnmatch(f, p) for f in repo_files for p in form):
            return HUB_CONFIG_FILES + form
    return HUB_FILES


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connect (no retries: fails in `timeout` seconds)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def local_init(init: str) -> Path | None:
    """The directory `--init` names, or None for scratch and hub ids (ValueError for a path that is no directory)."""
    if init == "scratch":
        return None
    p = Path(init).expanduser()
    if p.is_dir():
        return p
    if p.exists() or init.startswith((".", "/", "~")) or init.count("/") > 1:
        raise ValueError(f"--init: {init} is not a directory (give a model dir, a run dir, a hub id or scratch)")
    return None


def resolve_init(init: str) -> Path | None:
    """`scratch` -> None; a local directory -> itself; anything else is a hub id, downloaded."""
    local = local_init(init)
    if local is not None or init == "scratch":
        return local
    from huggingface_hub import snapshot_download

    if not hub_reachable():
        try:  # a copy downloaded earlier still works offline
            return Path(snapshot_download(init, allow_patterns=HUB_FILES, local_files_only=True))
        except Exception:
            raise ValueError(
                f"--init: {init} is neither a local directory nor reachable on the Hugging Face hub "
                "(offline, and not in the cache); pass a local model directory"
            ) from None
    try:
        from huggingface_hub import HfApi

        return Path(snapshot_download(init, allow_patterns=hub_patterns(HfApi().list_repo_files(init))))
    except Exception as e:
        raise ValueError(f"--init: cannot fetch {init} from the hub: {str(e).splitlines()[0]}") from None


def read_config(model_dir: Path) -> tuple[BertConfig, dict[str, Any]]:
    """BertConfig and the bert-dist metadata ({} for a Hugging Face dir) from `model_dir`/config.json."""
    f = model_dir / "config.json"
    if not f.is_file():
        raise ValueError(f"--init: {model_dir} has no config.json")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--init: {f} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"--init: {f} holds a JSON {type(d).__name__}, not a config object")
    if d.get("model_type", "bert") != "bert":
        raise ValueError(f"--init: {f} describes a {d['model_type']!r} model, not BERT")
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"--init: {f} has position_embedding_type {d['position_embedding_type']!r}; bert-dist's "
                         "BERT has absolute position embeddings only")
    try:
        return BertConfig.from_dict(d), d.get("bert_dist", {})
    except (TypeError, ValueError) as e:
        raise ValueError(f"--init: {f} is not a usable BERT config: {e}") from None


def weight_files(model_dir: Path) -> list[Path]:
    """The weight file(s) of `model_dir`: model.safetensors, else pytorch_model.bin, else the shards a
    save_pretrained index names (safetensors first); ValueError if none or an index is unreadable."""
    for name in WEIGHT_FILES:
        if (model_dir / name).is_file():
            return [model_dir / name]
    for index in SHARD_INDEXES:
        f = model_dir / index
        if not f.is_file():
            continue
        try:
            shards = sorted(set(json.loads(f.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise ValueError(f"--init: {f} is not a shard index (a JSON object with a weight_map)") from None
        missing = [n for n in shards if not (model_dir / n).is_file()]
        if missing or not shards:
            raise ValueError(f"--init: {f} names {len(shards)} shard(s), {len(missing)} missing from {model_dir} "
                             f"(e.g. {(missing or ['none listed'])[0]}); re-download the model")
        return [model_dir / n for n in shards]
    raise ValueError(f"--init: {model_dir} has no {' or '.join(WEIGHT_FILES)} (nor a sharded "
                     f"{' or '.join(SHARD_INDEXES)})")


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """Weights of `model_dir` (safetensors preferred; .bin only with weights_only=True), HF keys mapped."""
    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(model_dir):
        try:
            if f.suffix == ".safetensors":
                sd.update(load_file(str(f)))
            else:
                sd.update(torch.load(f, map_location="cpu", weights_only=True))
        except pickle.UnpicklingError:  # weights_only=True refused an object: checkpoints are data, never code
            raise ValueError(f"--init: {f} holds Python objects beyond tensors, which are not loaded (they could run "
                             "code); save the weights as safetensors or a plain state dict") from None
        except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as e:
            raise ValueError(
                f"--init: {f} is corrupt or truncated ({str(e).splitlines()[0][:120]}); re-download or re-save it"
            ) from None
    return map_hf_keys(sd)


def check_init(init: str, tokenizer: str | None = None, need_mask: bool = False) -> BertConfig | None:
    """Cheap checks of --init and --tokenizer, before a run creates anything: a local --init has a usable
    config.json, a weights file whose safetensors header is intact (a truncated file fails here) and a
    tokenizer; the tokenizer has BERT's special tokens. Returns the local --init's BertConfig, else None
    (scratch, or a hub id: checked when it is loaded)."""
    d = local_init(init)
    bert = None
    if d is not None:
        bert, _ = read_config(d)
        for weights in weight_files(d):
            if weights.suffix == ".safetensors":
                try:
                    with safe_open(str(weights), framework="pt") as fh:
                        fh.keys()
                except (SafetensorError, OSError) as e:
                    raise ValueError(f"--init: {weights} is corrupt or truncated ({str(e).splitlines()[0][:120]}); "
                                     "re-download or re-save it") from None
        if tokenizer is None and find_tokenizer_file(d) is None:
            raise ValueError(f"--init: {d} has no tokenizer.json or vocab.txt; pass --tokenizer")
    if tokenizer is not None or d is not None:
        tok_from = tokenizer or d
        check_special_tokens(load_tokenizer(tok_from), str(find_tokenizer_file(tok_from) or tok_from), need_mask)
    return bert


UNTIED_DECODER = "untied.cls.predictions.decoder.weight"
"""Where `map_hf_keys` puts an MLM decoder that differs from the word embeddings (tie_word_embeddings false):
no model of ours has the key, so fine-tuning reports it unused; `load_weights` refuses it for pretraining."""


def map_hf_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face / TF-converted BERT keys -> ours (a `bert.` prefix on the encoder, gamma/beta renamed)."""
    out = {}
    for k, v in sd.items():
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if k.startswith(ENCODER_PREFIXES):
            k = "bert." + k
        if k.endswith("position_ids") or k in TIED_KEYS:
            continue
        out[k] = v
    decoder, words = sd.get(TIED_KEYS[0]), out.get("bert.embeddings.word_embeddings.weight")
    if decoder is not None and words is not None and not torch.equal(decoder, words):
        out[UNTIED_DECODER] = decoder
    return out


def load_weights(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> dict[str, list[str]]:
    """Copy `sd` into `model`. Encoder shape mismatches are an error; head mismatches start fresh.

    Returns {"new": [...], "unused": [...]} key lists and logs each in one line.
    """
    own = model.state_dict()
    if UNTIED_DECODER in sd and TIED_KEYS[0] in own:
        raise ValueError(f"--init: {source} has an MLM decoder that is not its word embeddings (tie_word_embeddings "
                         "false); bert-dist ties the two, so pretraining from it would lose the decoder")
    mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    bad = [k for k in mismatched if k.startswith("bert.")]
    if bad:
        k = bad[0]
        raise ValueError(
            f"--init: {source} does not fit the model: {k} is {tuple(sd[k].shape)} in the checkpoint but "
            f"{tuple(own[k].shape)} here ({len(bad)} tensors differ); check the config/preset"
        )
    sd = {k: v for k, v in sd.items() if k not in mismatched}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in TIED_KEYS]
    enc_missing = [k for k in missing if k.startswith("bert.")]
    if enc_missing:
        log.warning("%s lacks %d encoder tensors (e.g. %s): they start from random", source, len(enc_missing),
                    enc_missing[0])
    head = sorted({k.rsplit(".", 1)[0] for k in missing if not k.startswith("bert.")})
    if head:
        log.info("new head, freshly initialised: %s", ", ".join(head))
    if unexpected:
        groups = sorted({k.split(".")[0] + "." + k.split(".")[1] if "." in k else k for k in unexpected})
        log.info("unused weights of %s: %d tensors (%s)", source, len(unexpected), ", ".join(groups))
    return {"new": missing, "unused": list(unexpected)}


def save_model(model: nn.Module | dict[str, torch.Tensor], out_dir: Path, config: BertConfig,
               meta: dict[str, Any]) -> None:
    """model.safetensors (tied tensors once) and config.json (BertConfig fields + `bert_dist` metadata). `model`: the
    module, or its whole state dict (what distributed.gather_state_dict gives under FSDP, where the module holds
    shards)."""
    _save_weights(model, out_dir)
    cfg = {"model_type": "bert", **config.to_dict(), "bert_dist": meta}
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _save_weights(model: nn.Module | dict[str, torch.Tensor], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model, out_dir / "model.safetensors")


def save_weights(model: nn.Module | dict[str, torch.Tensor], path: Path,
                 metadata: dict[str, str] | None = None) -> None:
    """`model`'s weights (the module, or its whole state dict) as safetensors at `path`, with `metadata`. The tied
    decoder is left out, as transformers' own save_pretrained does: its loaders tie it again."""
    weights = model.state_dict() if isinstance(model, nn.Module) else model
    sd = {k: v.detach().contiguous().cpu() for k, v in weights.items() if k not in TIED_KEYS}
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, path)  # never a half-written file under the real name


@dataclass
class InitSource:
    """What `--init` (and `--tokenizer`) provide: nothing for scratch, else config, weights, tokenizer."""

    name: str
    dir: Path | None = None
    config: BertConfig | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    state_dict: dict[str, torch.Tensor] | None = None
    tokenizer: Tokenizer | None = None


def load_init(init: str, tokenizer_path: str | None = None) -> InitSource:
    """Resolve `--init` (scratch | local dir | run dir | hub id) and `--tokenizer` (which wins)."""
    src = InitSource(name=init, dir=resolve_init(init))
    if src.dir is not None:
        src.config, src.meta = read_config(src.dir)
        src.state_dict = load_state_dict(src.dir)
        if tokenizer_path is None and find_tokenizer_file(src.dir) is None:
            raise ValueError(f"--init: {src.dir} has no tokenizer.json or vocab.txt; pass --tokenizer")
    tok_from = tokenizer_path or src.dir
    if tok_from is not None:
        src.tokenizer = load_tokenizer(tok_from)
    if src.tokenizer is not None and src.config is not None and src.tokenizer.get_vocab_size() > src.config.vocab_size:
        raise ValueError(
            f"--tokenizer: {src.tokenizer.get_vocab_size()} tokens but the model has {src.config.vocab_size} "
            "word embeddings; use the model's own tokenizer"
        )
    return src


def save_run_model(model: nn.Module | dict[str, torch.Tensor], out_dir: Path, config: BertConfig, meta: dict[str, Any],
                   tokenizer: Tokenizer) -> None:
    """A reloadable model directory: weights, config (+ metadata) and tokenizer, for `--init out_dir`."""
    save_model(model, out_dir, config, meta)
    save_tokenizer(tokenizer, out_dir)


# ---------------------------------------------------------------------------------------------
# A finished run as a model: rebuild its head, and export it for transformers

HF_ARCHITECTURES = {"classification": "BertForSequenceClassification", "regression": "BertForSequenceClassification",
                    "multi_label": "BertForSequenceClassification", "qa": "BertForQuestionAnswering",
                    "pretrain": "BertForPreTraining"}
"""bert_dist.kind -> the transformers class whose parameter names (and so whose checkpoint) ours are."""


def build_model(config: BertConfig, meta: dict[str, Any], source: str) -> nn.Module:
    """The model class a run saved, from its `bert_dist` metadata (kind, num_labels)."""
    kind = meta.get("kind")
    if kind in ("classification", "multi_label", "regression"):
        return BertForSequenceClassification(config, meta["num_labels"], regression=kind == "regression",
                                             multi_label=kind == "multi_label")
    if kind == "qa":
        return BertForQuestionAnswering(config)
    if kind == "pretrain":
        return BertForPreTraining(config)
    raise ValueError(f"--model: {source}/config.json names no bert-dist task (its `bert_dist.kind` is {kind!r}); "
                     "give the output directory of a bert-dist run")


def load_run_model(run_dir: str | os.PathLike) -> tuple[nn.Module, InitSource]:
    """A finished run's model in eval mode, every tensor from the checkpoint (else ValueError), on the CPU."""
    d = Path(run_dir)
    if not d.is_dir():
        raise ValueError(f"--model: {d} is not a directory")
    try:
        src = load_init(str(d))
    except ValueError as e:  # load_init speaks of --init; here the user gave --model
        raise ValueError(str(e).replace("--init", "--model", 1)) from None
    model = build_model(src.config, src.meta, str(d))
    missing, unexpected = model.load_state_dict(src.state_dict, strict=False)
    missing = [k for k in missing if k not in TIED_KEYS]
    if missing or unexpected:
        k = (missing or unexpected)[0]
        raise ValueError(f"--model: {d}/model.safetensors does not match its config.json "
                         f"({len(missing)} tensors missing, {len(unexpected)} unexpected, e.g. {k})")
    return model.eval(), src


def hf_tokenizer_config(tok: Tokenizer, model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json for transformers' BertTokenizer, its flags read off how `tok` normalizes, so a
    tokenizer rebuilt from vocab.txt alone splits text as `tok` does."""
    norm = tok.normalizer
    lower = norm is not None and norm.normalize_str("A") == "a"
    strip_accents = norm is not None and norm.normalize_str("\u00e9") == "e"
    return {"tokenizer_class": "BertTokenizer", "do_lower_case": lower, "strip_accents": strip_accents,
            "tokenize_chinese_chars": True, "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False, **HF_SPECIAL_TOKENS}


HF_SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                     "mask_token": "[MASK]"}


HF_PROBLEM_TYPES = {"classification": "single_label_classification", "multi_label": "multi_label_classification",
                    "regression": "regression"}
"""bert_dist.kind -> transformers' `problem_type` (which picks its loss, and the pipeline's softmax or sigmoid)."""


EXPORTED_DATA_SETTINGS = ("max_length", "doc_stride", "max_query_length", "n_best_size", "max_answer_length",
                          "null_score_diff_threshold", "eval_batch_size")
"""The run's settings `bert-dist predict` reads, kept in an export's `bert_dist` metadata (no run_config.json there)."""


def export_hf(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a run as a Hugging Face model directory that transformers' Auto classes load.

    config.json: `architectures`, `model_type`, the BertConfig fields, id2label/label2id from the task's
    label names (so `pipeline("text-classification")` names the classes), problem_type (regression for STS-B-style
    heads, multi_label_classification for a sigmoid per label), and the `bert_dist` metadata (so `--init`
    and `predict` read the export as they read the run). model.safetensors: the run's tensors under the
    same keys, which are transformers' (the tied MLM decoder left out, as save_pretrained leaves it out).
    Tokenizer: tokenizer.json, vocab.txt, tokenizer_config.json, special_tokens_map.json. The run's
    model card (README.md) is copied when there is one.
    """
    model, src = load_run_model(run_dir)
    out = Path(out_dir)
    if out.resolve() == Path(run_dir).resolve():
        raise ValueError("--out: give a directory other than the run's own")
    meta, kind = src.meta, src.meta["kind"]
    _save_weights(model, out)
    cfg: dict[str, Any] = {"architectures": [HF_ARCHITECTURES[kind]], "model_type": "bert", **src.config.to_dict()}
    if kind in HF_PROBLEM_TYPES:
        names = meta.get("label_names") or [f"LABEL_{i}" for i in range(meta["num_labels"])]
        cfg.update(id2label={str(i): n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)},
                   problem_type=HF_PROBLEM_TYPES[kind])
    if kind == "pretrain":
        cfg["tie_word_embeddings"] = True
    run_config = Path(run_dir) / "run_config.json"
    if run_config.is_file():  # the run's evaluation settings (max length, SQuAD windows...), for predict on the export
        try:
            data = json.loads(run_config.read_text()).get("data", {})
        except ValueError:
            data = {}
        meta = {**meta, "data": {k: data[k] for k in EXPORTED_DATA_SETTINGS if data.get(k) is not None}}
    cfg["bert_dist"] = meta
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_tokenizer(src.tokenizer, out)
    tok_cfg = hf_tokenizer_config(src.tokenizer, src.config.max_position_embeddings)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(HF_SPECIAL_TOKENS, indent=2) + "\n")
    if (Path(run_dir) / "README.md").is_file():
        shutil.copyfile(Path(run_dir) / "README.md", out / "README.md")
    return out
