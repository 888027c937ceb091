"""SentencePiece tokenizer: training from a document stream, and the wrapper the data uses.

`Tokenizer` is what megatron-core's GPTDataset and our trainer need: `vocab_size`, `eod`,
`encode`, `decode`, and `unique_identifiers` (megatron hashes it into its index-cache names).

A tokenizer's identity (`Tokenizer.identity`, `model_identity`) is a hash of what decides how
text becomes ids: the pieces with their scores and types, the normalizer and denormalizer specs,
and the trainer options the encoder reads (model type, byte fallback, splitting rules). Not the
file bytes: SentencePiece stores `model_prefix`, input paths and other training-only options in
the `.model`, so identical vocabularies trained under different names have different sha256.

Training settings and why:
- BPE with byte fallback: any byte sequence is encodable, nothing maps to <unk>.
- identity normalisation, no whitespace squeezing, "\\n" as a user-defined piece: decode(encode(t))
  gives back `t` exactly (up to a leading-space quirk of the dummy prefix), newlines included.
- SentencePiece silently drops training lines longer than `max_sentence_length` bytes, so
  documents are fed as lines, and lines are cut at whitespace below the limit (`training_lines`).
  Encoding has no length limit: long documents are always kept whole in the output.
- `input_sentence_size` makes SentencePiece reservoir-sample that many lines, bounding its memory
  on a large corpus.
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable, Iterator

MAX_SENTENCE_BYTES = 4192  # SentencePiece's default max_sentence_length
EOD_PIECE = "<|endoftext|>"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# TrainerSpec fields SentencePiece's encoder reads; every other field only steers training.
_ENCODING_TRAINER_FIELDS = (
    "model_type", "byte_fallback", "split_by_unicode_script", "split_by_number",
    "split_by_whitespace", "split_digits", "treat_whitespace_as_suffix",
    "allow_whitespace_only_pieces", "unk_surface",
)


def model_identity(serialized: bytes) -> str:
    """sha256 of the encoding-relevant parts of a serialized SentencePiece ModelProto."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(serialized)
    h = hashlib.sha256()
    for piece in m.pieces:
        h.update(piece.SerializeToString(deterministic=True))
        h.update(b"\x00")
    h.update(m.normalizer_spec.SerializeToString(deterministic=True))
    h.update(b"\x01")
    h.update(m.denormalizer_spec.SerializeToString(deterministic=True))
    h.update(b"\x02")
    for name in _ENCODING_TRAINER_FIELDS:
        h.update(f"{name}={getattr(m.trainer_spec, name)!r};".encode())
    return h.hexdigest()


class Tokenizer:
    """A SentencePiece model with an end-of-document id. Picklable (reloads from `path`)."""

    def __init__(self, model_path: str):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"tokenizer model {model_path!r} not found; pass the .model written by "
                "mom-preprocess (next to the output prefix) or your own SentencePiece model"
            )
        self.path = model_path
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as err:
            raise ValueError(
                f"tokenizer model {model_path!r} is not a readable SentencePiece model ({err}); "
                "pass the .model written by mom-preprocess (PREFIX_tokenizer.model) or by spm_train"
            ) from None
        self.vocab_size = int(self._sp.vocab_size())
        eod = self._sp.piece_to_id(EOD_PIECE)
        if self._sp.id_to_piece(eod) != EOD_PIECE:  # not in vocab: fall back to </s>, then the last id
            eod = self._sp.eos_id() if self._sp.eos_id() >= 0 else self.vocab_size - 1
        self.eod = int(eod)
        self.sha256 = file_sha256(model_path)
        self.identity = model_identity(self._sp.serialized_model_proto())
        # megatron-core hashes these into the names of its cached sample indices.
        self.unique_identifiers = {"class": "mom_dist.SentencePiece", "identity": self.identity}

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Encode a list. One thread by default: a preprocessing worker is one core, so that
        ``--workers N`` means N cores (SentencePiece would otherwise use every core per call)."""
        return self._sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) != self.eod])


def training_lines(text: str, max_bytes: int = MAX_SENTENCE_BYTES - 192) -> Iterator[str]:
    """Split a document into lines shorter than SentencePiece's training limit.

    Lines are the document's own lines; a longer one is cut at the last whitespace before the
    limit (or hard, at a character boundary, when it has none).
    """
    for line in text.split("\n"):
        if not line.strip():
            continue
        while len(line.encode("utf-8")) > max_bytes:
            head = line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
            cut = head.rfind(" ")
            cut = cut if cut > 0 else len(head)
            yield line[:cut]
            line = line[cut:]
        if line.strip():
            yield line


def train_tokenizer(
    texts: Iterable[str],
    model_prefix: str,
    *,
    vocab_size: int = 32000,
    model_type: str = "bpe",
    input_sentence_size: int = 2_000_000,
    seed: int = 1234,
    num_threads: int = 1,
) -> str:
    """Train a SentencePiece model on `texts` (documents); write `{model_prefix}.model`.

    Returns the model path. Ids: 0 <unk>, 1 <|endoftext|> (the end-of-document id, also
    SentencePiece's eos), then 256 byte pieces, "\\n", then the learned pieces. With a tiny
    corpus the vocab may come out smaller than asked (`hard_vocab_limit=False`).
    """
    import sentencepiece as spm

    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} is too small; byte fallback alone needs 259 ids, use >= 300")
    spm.set_random_generator_seed(seed)

    raised = []  # SentencePiece turns an exception in the iterator into RuntimeError: keep ours

    def lines():
        try:
            for text in texts:
                yield from training_lines(text)
        except Exception as err:
            raised.append(err)
            raise

    try:
        _train(spm, lines(), model_prefix, vocab_size, model_type, input_sentence_size, num_threads)
    except RuntimeError as err:
        if raised:
            raise raised[0] from None
        if "required_chars" in str(err) or "Vocabulary size" in str(err):
            raise ValueError(f"vocab_size={vocab_size} is too small for this corpus's characters "
                             f"({err}); raise --vocab-size") from err
        raise ValueError(f"SentencePiece could not train a tokenizer on these inputs ({err})") from err
    return model_prefix + ".model"


def _train(spm, lines, model_prefix, vocab_size, model_type, input_sentence_size, num_threads):
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=["\n"],
        character_coverage=0.9995,
        unk_id=0,
        eos_id=1,
        eos_piece=EOD_PIECE,
        bos_id=-1,
        pad_id=-1,
        hard_vocab_limit=False,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=MAX_SENTENCE_BYTES,
        num_threads=num_threads,
        minloglevel=2,
    )
