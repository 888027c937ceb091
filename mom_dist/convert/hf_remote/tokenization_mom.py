"""transformers tokenizer for mom_dist's SentencePiece models, written by ``mom-convert to-hf``.

Needs only transformers and sentencepiece (``AutoTokenizer.from_pretrained(dir,
trust_remote_code=True)``). Text is encoded by the SentencePiece model itself, so ids equal
mom_dist's ``Tokenizer.encode`` (a test checks it); transformers' generic converters would
rebuild the pipeline (digit splitting, byte fallback, the "\\n" piece) and can disagree.

Special tokens (mom_dist's tokenizer training fixes the ids): ``<unk>`` 0 is also the padding
token (byte fallback means no text ever encodes to it, so padding is unambiguous), and
``<|endoftext|>`` 1 - the end-of-document id of our data - is bos and eos. No bos/eos is added
when encoding (our documents carry no start token; they end with the end-of-document id).
"""

import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class MoMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, unk_token="<unk>", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                 pad_token="<unk>", **kwargs):
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                         **kwargs)

    @property
    def vocab_size(self):
        return self.sp.get_piece_size()

    def get_vocab(self):
        vocab = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp.id_to_piece(int(index))

    def convert_tokens_to_string(self, tokens):
        """SentencePiece decodes runs of ordinary pieces (byte pieces and the space marker
        included); special tokens are written as they are."""
        out, run = [], []
        specials = set(self.all_special_tokens)
        for t in tokens:
            if t in specials:
                out.append(self.sp.decode_pieces(run))
                out.append(t)
                run = []
            else:
                run.append(t)
        out.append(self.sp.decode_pieces(run))
        return "".join(out)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        name = (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
        dest = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(dest):
            shutil.copyfile(self.vocab_file, dest)
        return (dest,)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["sp"] = None
        state["_sp_proto"] = self.sp.serialized_model_proto()
        return state

    def __setstate__(self, state):
        proto = state.pop("_sp_proto")
        self.__dict__.update(state)
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(proto)
