"""WordPiece tokenizers with the `tokenizers` library: load (tokenizer.json or vocab.txt) and train.

Every tokenizer handed out here has BERT's post-processor ([CLS] A [SEP] (B [SEP]) with token type
ids 0/1), and no padding or truncation of its own: callers set truncation per use (GLUE pairs are
truncated longest-first, SQuAD windows are built by hand) and padding happens per batch in the collator.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
"""Fixed order, so a trained tokenizer has [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4."""

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
_WARNED: set[str] = set()  # vocab.txt files already warned about (a run loads its tokenizer more than once)


def find_tokenizer_file(path: str | os.PathLike) -> Path | None:
    """tokenizer.json or vocab.txt: `path` itself, or the first one found inside the directory `path`."""
    p = Path(path)
    if p.is_file():
        return p
    for name in TOKENIZER_FILES:
        if (p / name).is_file():
            return p / name
    return None


def _bert_post_processor(tok: Tokenizer) -> processors.TemplateProcessing:
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    return processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )


def _vocab_is_cased(vocab: dict[str, int]) -> bool:
    """A cased vocabulary holds many capitalised pieces; an uncased one only a stray few."""
    upper = sum(1 for t in vocab if t[:1].isupper() and not t.startswith("["))
    return upper > 0.01 * len(vocab)


def check_special_tokens(tok: Tokenizer, source: str, need_mask: bool = False) -> None:
    """Raise ValueError naming `source` if BERT's special tokens are missing."""
    need = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + (["[MASK]"] if need_mask else [])
    missing = [t for t in need if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(
            f"--tokenizer/--init: the tokenizer {source} lacks {' '.join(missing)}; BERT needs [PAD] [UNK] [CLS] "
            "[SEP] (and [MASK] to pretrain): use a BERT WordPiece tokenizer, or --init scratch without --tokenizer "
            "to train one"
        )


def load_tokenizer(path: str | os.PathLike, lowercase: bool | None = None) -> Tokenizer:
    """Load a BERT tokenizer from tokenizer.json, vocab.txt, or a directory holding either.

    For vocab.txt, lowercasing comes from `lowercase`, else from a tokenizer_config.json beside it
    (`do_lower_case`), else from the vocabulary itself (uncased vocabularies have almost no capitals);
    `strip_accents` and `tokenize_chinese_chars` from tokenizer_config.json too, as transformers' BertTokenizer
    reads them. A token's id is its line number; a token on two lines keeps the later one, as there.
    """
    file = find_tokenizer_file(path)
    if file is None:
        raise ValueError(f"--tokenizer/--init: no tokenizer.json or vocab.txt at {path}")
    try:
        if file.suffix == ".json":
            tok = Tokenizer.from_file(str(file))
        else:
            with open(file, encoding="utf-8") as fh:
                lines = [line.rstrip("\n") for line in fh]
            vocab = {t: i for i, t in enumerate(lines)}  # the last line of a repeated token wins
            if len(vocab) < len(lines):  # the earlier lines keep their ids with a name no text produces
                first = next(t for i, t in enumerate(lines) if vocab[t] != i)
                if str(file) not in _WARNED:
                    _WARNED.add(str(file))
                    log.warning("%s: %d repeated token(s) (e.g. %r at lines %d and %d); ids are line numbers, the "
                                "later line wins (as transformers reads it)", file, len(lines) - len(vocab), first,
                                lines.index(first) + 1, vocab[first] + 1)
                vocab.update({f"[repeated line {i + 1}]": i for i, t in enumerate(lines) if vocab[t] != i})
            cfg_file = file.parent / "tokenizer_config.json"
            tok_cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
            tok_cfg = tok_cfg if isinstance(tok_cfg, dict) else {}
            if lowercase is None:
                lowercase = tok_cfg.get("do_lower_case")
            if lowercase is None:
                lowercase = not _vocab_is_cased(vocab)
            tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
            tok.normalizer = normalizers.BertNormalizer(
                clean_text=True, handle_chinese_chars=tok_cfg.get("tokenize_chinese_chars", True) is not False,
                strip_accents=tok_cfg.get("strip_accents"), lowercase=bool(lowercase),
            )
            tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            tok.decoder = decoders.WordPiece(prefix="##")
    except (OSError, UnicodeDecodeError, Exception) as e:  # tokenizers raises plain Exception
        if isinstance(e, ValueError) and "--tokenizer" in str(e):
            raise
        raise ValueError(f"--tokenizer/--init: cannot read tokenizer {file}: {str(e).splitlines()[0]}") from e
    check_special_tokens(tok, str(file))
    # Some shipped tokenizer.json files pad/truncate to a fixed length (sentence-transformers: 128).
    tok.no_padding()
    tok.no_truncation()
    tok.post_processor = _bert_post_processor(tok)
    return tok


def train_tokenizer(texts: Iterable[str] | Callable[[], Iterable[str]], vocab_size: int = 30522,
                    lowercase: bool = True) -> Tokenizer:
    """Train a BERT WordPiece tokenizer on `texts` (special tokens at ids 0-4), the same vocab.txt byte for byte
    from the same texts and flags.

    `texts`: a zero-argument callable that returns a fresh iterator over the corpus (it is read twice, streamed:
    memory grows with the corpus's distinct words, not its size), or an iterable (a one-shot iterator is kept in
    memory for the second pass: small corpora only).

    Why two passes: the `tokenizers` trainer gives each continuation piece `##c` its id in the order it meets them
    in a hash map whose seed is drawn per process, and it breaks ties between merges of equal count by those ids;
    so the ids, and at the vocabulary's edge the tokens themselves, change from run to run. The first pass collects
    the characters that can continue a word; their `##c` pieces are handed to the trainer up front, in code point
    order, as it hands out the special tokens, so every id and tie is fixed before the merges start. (A `##c` for a
    character that never continues a word in the corpus may then be in the vocabulary: never produced, harmless.)
    """
    if not callable(texts):
        items = texts if isinstance(texts, (list, tuple)) else list(texts)
        texts = lambda: iter(items)  # noqa: E731

    def untrained() -> Tokenizer:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None if lowercase else False, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        return tok

    chars = continuation_chars(_characters(texts()), untrained())
    while True:
        tok = untrained()
        specials = SPECIAL_TOKENS + [f"##{c}" for c in chars]
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                            continuing_subword_prefix="##", show_progress=False)
        tok.train_from_iterator(_batched(texts()), trainer=trainer)
        # A character the first pass did not foresee (normalization in context) got its id in hash order: train
        # again with it among the others (its presence is a function of the corpus, so this is deterministic too).
        unforeseen = sorted(t[2:] for t in tok.get_vocab() if t.startswith("##") and len(t) == 3 and t[2:] not in chars)
        if not unforeseen:
            break
        chars = sorted({*chars, *unforeseen})
    # The same vocabulary without the `##c` pieces as added tokens (which would match raw text before splitting).
    trained = Tokenizer(models.WordPiece(tok.get_vocab(), unk_token="[UNK]", continuing_subword_prefix="##"))
    trained.normalizer, trained.pre_tokenizer = tok.normalizer, tok.pre_tokenizer
    trained.decoder = decoders.WordPiece(prefix="##")
    trained.add_special_tokens(SPECIAL_TOKENS)
    trained.post_processor = _bert_post_processor(trained)
    return trained


def _characters(texts: Iterable[str]) -> set[str]:
    chars: set[str] = set()
    for batch in _batched(texts, 10_000):
        chars.update("".join(batch))
    return chars


def continuation_chars(chars: Iterable[str], tok: Tokenizer) -> list[str]:
    """The characters, after `tok`'s normalizer, that can follow another inside one word of `tok`'s pre-tokenizer
    (not whitespace, punctuation or CJK, which stand alone), in code point order."""
    out: set[str] = set()
    norm = tok.normalizer.normalize_str
    for c in chars:
        for d in {c, *norm(c), *norm("a" + c)[1:]}:  # context matters to some (a final sigma lowercases to ς)
            s = norm("a" + d)
            if len(s) > 1 and [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(s)] == [s]:
                out.update(s[1:])
    return sorted(out)


def _batched(texts: Iterable[str], n: int = 1000) -> Iterator[list[str]]:
    batch = []
    for t in texts:
        batch.append(t)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def save_tokenizer(tok: Tokenizer, out_dir: str | os.PathLike) -> None:
    """Write tokenizer.json and vocab.txt (for tools that read only the latter) into `out_dir`."""
    out = Path(out_dir)
    tok.save(str(out / "tokenizer.json"))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    (out / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")


def train_shared_tokenizer(
    texts: Callable[[], Iterable[str]],
    is_main: bool,
    share: Callable[[str | None], str],
    vocab_size: int = 30522,
    lowercase: bool = True,
) -> Tokenizer:
    """Train on the main process and give every other process the very same tokenizer: `share` broadcasts the main
    process's tokenizer.json text (None elsewhere) and returns it on every process.

    Training is deterministic (`train_tokenizer`), but it is the longest step before the data: one process trains
    and the others wait for its copy rather than each spending the time. Nothing is
    written here: the run saves it into its output directory once a previous run there has been discarded
    (`--overwrite`; before that the previous model would sit beside a tokenizer that is not its own).
    """
    tok = None
    if is_main:
        log.info("training a WordPiece tokenizer (vocab %d, %s)", vocab_size, "lowercased" if lowercase else "cased")
        tok = train_tokenizer(texts(), vocab_size=vocab_size, lowercase=lowercase)
        if (n := tok.get_vocab_size()) > vocab_size:
            log.warning("--vocab-size %d: the tokenizer has %d tokens (WordPiece keeps every character of the corpus, "
                        "with and without ##, and the 5 special tokens, whatever the size asked for)", vocab_size, n)
        elif n < vocab_size:
            log.info("the tokenizer has %d tokens, fewer than --vocab-size %d: the corpus has no more to merge",
                     n, vocab_size)
    shared = share(tok.to_str() if tok is not None else None)
    return tok if tok is not None else Tokenizer.from_str(shared)
