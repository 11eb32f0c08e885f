"""Corpora and the deterministic, resumable batch loader.

Batch ``s`` is a pure function of (seed, s, host): its global example indices are ``s*B .. s*B+B-1``
(of which this host takes its contiguous rows), mapped through a seeded permutation per epoch, and the
objective's randomness comes from ``np.random.default_rng((seed, s, host))``. The loader's whole state
is therefore the next step — one integer saved with every checkpoint — and a resumed run sees exactly
the batches an uninterrupted run would. Batches are built ahead in one background thread, which also
hands them to ``put`` (the train loop's transfer onto the mesh), so the step never waits for either.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from .config import DataSection, TrainConfigError

__all__ = ["read_corpus", "token_chunks", "document_pieces", "make_examples", "Loader"]


def _format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "jsonl" if path.endswith((".jsonl", ".json")) else "text"


def read_corpus(path: str, fmt: str = "auto") -> list:
    """Documents of a corpus: text files give one document per non-empty line, jsonl files one dict per line."""
    if not path:
        raise TrainConfigError("no corpus given (set data.train)")
    if not os.path.exists(path):
        raise TrainConfigError(f"{path}: no such corpus file")
    fmt = _format(path, fmt)
    docs: list = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if fmt == "jsonl":
                try:
                    docs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise TrainConfigError(f"{path}:{lineno}: invalid JSON ({e})") from None
            else:
                docs.append(line)
    if not docs:
        raise TrainConfigError(f"{path}: the corpus is empty")
    return docs


def _field(doc, key: str, path: str):
    if isinstance(doc, str):
        if key in ("text",):
            return doc
        raise TrainConfigError(f"{path}: a plain-text corpus has no {key!r} field; use a jsonl corpus")
    if key not in doc:
        raise TrainConfigError(f"{path}: a record has no {key!r} field (fields: {sorted(doc)})")
    return doc[key]


def token_chunks(docs_ids: Sequence[Sequence[int]], length: int, separator: Optional[int] = None) -> np.ndarray:
    """Concatenate documents (``separator`` between them, if given) and cut [N, length] chunks."""
    parts = []
    for ids in docs_ids:
        parts.append(np.asarray(ids, np.int32))
        if separator is not None:
            parts.append(np.asarray([separator], np.int32))
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    n = len(stream) // length
    if n == 0:
        raise TrainConfigError(f"the corpus has {len(stream)} tokens, fewer than one {length}-token example")
    return stream[: n * length].reshape(n, length)


def document_pieces(docs_ids: Sequence[Sequence[int]], length: int, min_length: int = 2) -> list[np.ndarray]:
    """Each document cut into consecutive pieces of at most ``length`` tokens (the last one shorter); pieces
    never cross a document boundary, and pieces under ``min_length`` tokens are dropped. The examples of
    packed pretraining: a short document is one short example, several of which share a row."""
    out = []
    for ids in docs_ids:
        ids = np.asarray(ids, np.int32)
        out += [ids[i : i + length] for i in range(0, len(ids), length) if len(ids[i : i + length]) >= min_length]
    if not out:
        raise TrainConfigError(f"the corpus has no document of {min_length} tokens or more")
    return out


def make_examples(docs: list, tokenizer, objective, data: DataSection, path: str = "corpus", *, pack: bool = False) -> Sequence[Any]:
    """Tokenise a corpus into the kind of examples ``objective`` builds batches from. With ``pack``,
    pretraining text is cut per document (:func:`document_pieces`) rather than as one stream."""
    kind = objective.kind
    enc = tokenizer.encode
    if kind == "tokens":
        texts = [_field(d, data.text_key if not isinstance(d, str) else "text", path) for d in docs]
        if pack:
            return document_pieces([enc(t) for t in texts], objective.example_len)
        return token_chunks([enc(t) for t in texts], objective.example_len, getattr(objective, "doc_separator", None))
    if kind == "pairs":
        return [(enc(_field(d, data.source_key, path)), enc(_field(d, data.target_key, path))) for d in docs]
    if kind == "labels":
        out = []
        for d in docs:
            b = d.get(data.text_key + "_pair") if isinstance(d, dict) else None
            out.append(((enc(_field(d, data.text_key, path)), enc(b) if b is not None else None), _field(d, data.label_key, path)))
        return out
    if kind == "spans":
        out = []
        for d in docs:
            q, c = _field(d, "question", path), _field(d, "context", path)
            answers = (_field(d, "answers", path) or [])
            if answers:
                a = answers[0]
                s = len(enc(c[: a["answer_start"]]))
                e = len(enc(c[: a["answer_start"] + len(a["text"])])) - 1
            else:
                s = e = -1
            out.append((enc(q), enc(c), (s, e)))
        return out
    raise TrainConfigError(f"objective {objective.name!r} asks for unknown example kind {kind!r}")


class Loader:
    """Deterministic batches ``build(examples[idx], rng)`` for steps 0, 1, ...; state = next step."""

    def __init__(
        self,
        examples: Sequence[Any],
        build: Callable[[list, np.random.Generator], dict],
        *,
        batch_size: int,
        rows: tuple[int, int] = (0, -1),
        seed: int = 0,
        shuffle: bool = True,
        host: int = 0,
        prefetch: int = 2,
        put: Optional[Callable[[dict], Any]] = None,
    ):
        self.examples = examples
        self.build = build
        self.batch_size = batch_size
        self.rows = (rows[0], batch_size if rows[1] < 0 else rows[1])
        self.seed, self.shuffle, self.host, self.prefetch = int(seed), shuffle, int(host), int(prefetch)
        self.put = put  # iteration yields put(batch) (e.g. device arrays), made in the background thread
        self.step = 0
        self._perm_cache: dict[int, np.ndarray] = {}
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pending: dict[int, concurrent.futures.Future] = {}

    # -- state --------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"step": int(self.step), "seed": self.seed, "batch_size": self.batch_size, "num_examples": len(self.examples)}

    def restore(self, state: dict) -> None:
        for k in ("seed", "batch_size", "num_examples"):
            if k in state and int(state[k]) != int(self.state()[k]):
                raise TrainConfigError(
                    f"the checkpoint's data loader had {k}={state[k]}, this run has {self.state()[k]}: resuming would not "
                    "replay the same batches"
                )
        self._drop_pending()
        self.step = int(state["step"])

    # -- batches -------------------------------------------------------------------------------
    def _perm(self, epoch: int) -> np.ndarray:
        p = self._perm_cache.get(epoch)
        if p is None:
            n = len(self.examples)
            p = np.random.default_rng((self.seed, 0x5EED, epoch)).permutation(n) if self.shuffle else np.arange(n)
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            self._perm_cache[epoch] = p
        return p

    def indices(self, step: int) -> np.ndarray:
        n = len(self.examples)
        g = step * self.batch_size + np.arange(self.rows[0], self.rows[1])
        return np.array([self._perm(int(i // n))[i % n] for i in g], np.int64)

    def batch(self, step: int) -> dict:
        rng = np.random.default_rng((self.seed, step, self.host))
        return self.build([self.examples[i] for i in self.indices(step)], rng)

    def _next_item(self, step: int):
        b = self.batch(step)
        return b if self.put is None else self.put(b)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        step = self.step
        if self.prefetch <= 0:
            out = self._next_item(step)
        else:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lmzoo-data")
            for s in range(step, step + self.prefetch + 1):
                if s not in self._pending:
                    self._pending[s] = self._pool.submit(self._next_item, s)
            out = self._pending.pop(step).result()
        self.step = step + 1
        return out

    def _drop_pending(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()

    def close(self) -> None:
        self._drop_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
