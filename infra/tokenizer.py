"""The tokenizer: SentencePiece `tokenizer.model` (Llama, Mistral, our own) or, through the optional `tokenizers`
package, `tokenizer.json` (Qwen2.5, SmolLM2); and `train_tokenizer`, which makes the one `init` models ship with."""
from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from pathlib import Path

from infra.files import UserError, read_json

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class Tokenizer:
    """SentencePiece `tokenizer.model` (Llama, Mistral, our own) or, via the optional `tokenizers` package,
    `tokenizer.json` (Qwen2.5). No special tokens are added by encode(): the data code places BOS/EOS itself."""

    def __init__(self, path: Path, encoder, bos_id: int | None, eos_id: int | None, pad_id: int | None,
                 vocab_size: int):
        self.path, self._encoder = path, encoder
        self.file = path / ("tokenizer.model" if hasattr(encoder, "encode_as_ids") else "tokenizer.json")
        if eos_id is None:
            raise UserError(f"{self.file}: cannot tell the EOS token; add eos_token to tokenizer_config.json")
        self.bos_id, self.eos_id, self.pad_id, self.vocab_size = bos_id, eos_id, pad_id, vocab_size

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if (path / "tokenizer.model").exists():
            import sentencepiece as spm
            try:
                sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
            except (RuntimeError, OSError) as e:  # the C++ library reports a bad or unreadable file as RuntimeError
                raise UserError(f"{path / 'tokenizer.model'}: not a SentencePiece model ({e}); expected the "
                                "tokenizer.model written by init or shipped with the model") from None
            bos = sp.bos_id() if sp.bos_id() >= 0 else None
            eos = sp.eos_id() if sp.eos_id() >= 0 else _special_id(path, "eos_token", sp.piece_to_id)
            pad = sp.pad_id() if sp.pad_id() >= 0 else eos
            return cls(path, sp, bos, eos, pad, sp.get_piece_size())
        if (path / "tokenizer.json").exists():
            try:
                from tokenizers import Tokenizer as HFTokenizer
            except ImportError:
                raise UserError(f"{path}: only tokenizer.json found; it needs the optional package "
                                "'tokenizers' (pip install tokenizers)") from None
            try:
                tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # tokenizers raises a bare Exception for any unreadable file
                raise UserError(f"{path / 'tokenizer.json'}: not a Hugging Face tokenizer ({e}); expected the "
                                "tokenizer.json shipped with the model") from None
            eos = _special_id(path, "eos_token", tok.token_to_id)
            bos = _special_id(path, "bos_token", tok.token_to_id)
            pad = _special_id(path, "pad_token", tok.token_to_id)
            return cls(path, tok, bos, eos, eos if pad is None else pad, tok.get_vocab_size())
        raise UserError(f"{path}: no tokenizer.model or tokenizer.json")

    def encode(self, text: str) -> list[int]:
        if hasattr(self._encoder, "encode_as_ids"):
            return self._encoder.encode_as_ids(text)
        return self._encoder.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of every text, on all cores; the same ids."""
        if hasattr(self._encoder, "encode_as_ids"):
            return self._encoder.encode(texts, out_type=int, num_threads=os.cpu_count() or 1)
        return [e.ids for e in self._encoder.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._encoder.decode(list(ids))

    def save(self, path: Path) -> None:
        for name in TOKENIZER_FILES:
            if (self.path / name).exists() and self.path.resolve() != Path(path).resolve():
                shutil.copyfile(self.path / name, Path(path) / name)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name in TOKENIZER_FILES:
            if (self.path / name).exists():
                h.update(name.encode() + (self.path / name).read_bytes())
        return h.hexdigest()[:16]


def _special_id(path: Path, name: str, to_id) -> int | None:
    """Find a special token's id from tokenizer_config.json, else from config.json's `<name>_id`."""
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        if (path / file).exists():
            settings = read_json(path / file)
            token = settings.get(name) if isinstance(settings, dict) else None
            token = token.get("content") if isinstance(token, dict) else token
            if token is not None and to_id(token) is not None:
                return to_id(token)
    if (path / "config.json").exists():
        config = read_json(path / "config.json")
        token_id = config.get(f"{name}_id") if isinstance(config, dict) else None
        return token_id[0] if isinstance(token_id, list) and token_id else token_id
    return None


def check_fits(path: Path, vocab_size: int) -> None:
    """Refuse a checkpoint's tokenizer whose ids do not all fit its embedding (an IndexError mid-run otherwise)."""
    if not any((path / name).exists() for name in ("tokenizer.model", "tokenizer.json")):
        return  # weights alone (a conversion, a test); the commands load the tokenizer from the same folder
    tokenizer = Tokenizer.from_pretrained(path)
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"{tokenizer.file}: {tokenizer.vocab_size} tokens but config.json has vocab_size "
                        f"{vocab_size}; expected the tokenizer the model was trained with")


# --------------------------------------------------------------------------------------------------- training
def train_tokenizer(texts, out_dir: Path, vocab_size: int) -> None:
    """Train a byte-fallback BPE SentencePiece model on `texts` (Llama's recipe) and write tokenizer.model.

    One thread and a fixed input order make the result reproducible.
    """
    import sentencepiece as spm
    if vocab_size < 1:
        raise UserError(f"--vocab {vocab_size}: expected a positive vocabulary size")
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buffer, vocab_size=vocab_size, model_type="bpe",
            character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=True, split_digits=True, user_defined_symbols=["\n"], num_threads=1,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, hard_vocab_limit=False, minloglevel=2)
    except RuntimeError as e:
        if needed := re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", str(e)):
            least = int(needed[1]) + 4  # the characters, the unknown token, BOS, EOS and padding
            raise UserError(f"--vocab {vocab_size}: too small for the characters of the dataset's texts "
                            f"(SentencePiece needs {needed[1]} pieces for them); expected at least {least}") from None
        raise UserError(f"tokenizer training failed: {str(e).strip()[:200]}") from None
    (out_dir / "tokenizer.model").write_bytes(buffer.getvalue())
