"""MovieLens-100K as a click-through task: sparse 64-bit feature ids, labels, a time-ordered split.

The ratings come from the files that the ``recbole`` wheel ships (``pip install --no-deps recbole``;
nothing of recbole is imported, only its data folder is read). GroupLens' terms allow research use;
the files are read from the installed package and never copied.

Every feature is an id in the full 64-bit range: a base feature is the stable hash of
``"field=value"`` (BLAKE2b, 8 bytes) and a crossed feature mixes the ids of its parts with a
field-salted splitmix64. Ids therefore never collide across fields, are the same in every process
and on every run, and could share one table as well as live in one table per field.

Only numpy and the standard library are used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass

import numpy as np

__all__ = ["DatasetMissingError", "Dataset", "Field", "find_data_dir", "load", "auc",
           "stable_id", "cross_ids", "split_rows", "FIELDS", "SPLITS"]

INSTALL_HINT = "pip install --no-deps recbole"

#: The features, in the order of the model's field axis. Multi-valued fields (genres and the
#: crosses with genres) hold up to one id per genre of the movie and are mean-pooled by the model.
FIELDS = (
    "user", "item", "occupation", "gender", "age", "zip", "zip3", "genre", "year",
    "user_x_genre", "item_x_age", "item_x_gender", "occupation_x_genre", "age_x_genre",
)

# Age buckets of the MovieLens-1M convention.
_AGE_EDGES = np.array([18, 25, 35, 45, 50, 56])


class DatasetMissingError(RuntimeError):
    """The MovieLens-100K files are not installed."""


@dataclass(frozen=True)
class Field:
    """One feature field for a set of examples.

    ``ids`` is uint64 ``(n, width)``; ``weights`` is float32 ``(n, width)``: ``1/count`` on the
    valid slots of a row (so a weighted sum is the mean over the row's ids), 0 on padding slots,
    whose id is 0 and never looked up.
    """

    ids: np.ndarray
    weights: np.ndarray

    def take(self, rows: np.ndarray) -> Field:
        """The field for a subset of the examples."""
        return Field(self.ids[rows], self.weights[rows])


#: The time-ordered splits :func:`load` knows.
SPLITS = ("user", "global")


@dataclass(frozen=True)
class Dataset:
    """All 100,000 ratings, sorted by timestamp (stable), as features and labels.

    ``fields`` maps each name of :data:`FIELDS` to its :class:`Field`; ``labels`` is float32 (1
    where rating >= 4); ``train`` and ``test`` are increasing example indices (see
    :func:`split_rows`).
    """

    fields: dict[str, Field]
    labels: np.ndarray
    timestamps: np.ndarray
    train: np.ndarray
    test: np.ndarray
    split: str

    @property
    def num_examples(self) -> int:
        return int(self.labels.shape[0])


def split_rows(user: np.ndarray, split: str, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices of examples already sorted by time; both splits are time-ordered.

    ``"global"``: the latest ``test_fraction`` of all ratings is the test set. In MovieLens-100K
    users arrive over the months, so 85% of those test ratings are by users with no training
    rating: a cold-start task where even the best models here stay near AUC 0.70.
    ``"user"``: the latest ``test_fraction`` of each user's ratings (rounded) is the test set
    (RecBole's ordered split grouped by user): every prediction is about a user's future from
    that user's past.
    """
    n = user.shape[0]
    if split == "global":
        num_train = int(round(n * (1.0 - test_fraction)))
        return np.arange(num_train), np.arange(num_train, n)
    if split != "user":
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    is_test = np.zeros(n, dtype=bool)
    order = np.argsort(user, kind="stable")  # stable: each user's ratings stay in time order
    grouped = user[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    ends = np.r_[starts[1:], n]
    for start, end in zip(starts, ends):
        k = int(round((end - start) * test_fraction))
        is_test[order[end - k:end]] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def find_data_dir() -> str:
    """The ``ml-100k`` folder inside the installed recbole package.

    Raises DatasetMissingError (with the install command) when recbole or its files are missing.
    """
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetMissingError(f"MovieLens-100K comes from the recbole wheel; install it with: "
                                  f"{INSTALL_HINT}")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "dataset_example", "ml-100k")
    for name in ("ml-100k.inter", "ml-100k.user", "ml-100k.item"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise DatasetMissingError(f"{os.path.join(folder, name)} is missing; reinstall with: "
                                      f"{INSTALL_HINT}")
    return folder


def _read_table(path: str) -> tuple[list[str], list[list[str]]]:
    """A recbole atomic file: a header of ``name:type`` columns, then tab-separated rows."""
    with open(path, encoding="utf-8", errors="replace") as f:
        header = [h.split(":", 1)[0] for h in f.readline().rstrip("\n").split("\t")]
        rows = []
        for line in f:
            line = line.rstrip("\n")
            if line:
                parts = line.split("\t")
                parts += [""] * (len(header) - len(parts))
                rows.append(parts)
    return header, rows


# -- hashing ---------------------------------------------------------------------------------------

_U64 = np.uint64


def stable_id(field: str, value: object) -> int:
    """The 64-bit id of feature ``field=value``: the same in every process and on every machine."""
    digest = hashlib.blake2b(f"{field}={value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on a uint64 array (wraps modulo 2**64 by design)."""
    z = x + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def cross_ids(field: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Ids of the crossed feature ``field`` of the id arrays ``a`` and ``b`` (broadcast, uint64).

    Salted with ``field`` so that crossing the same parts for two fields gives two id sets.
    """
    a, b = np.broadcast_arrays(np.asarray(a, dtype=_U64), np.asarray(b, dtype=_U64))
    salt = np.full(a.shape, stable_id("cross", field), dtype=_U64)
    return _splitmix64(_splitmix64(a.reshape(-1) ^ salt.reshape(-1)) ^ b.reshape(-1)).reshape(
        a.shape) if a.size else np.zeros(a.shape, dtype=_U64)


def _hash_values(field: str, values: list[str]) -> np.ndarray:
    """Ids of ``field=value`` for many values; each distinct value is hashed once."""
    cache: dict[str, int] = {}
    out = np.empty(len(values), dtype=_U64)
    for i, v in enumerate(values):
        h = cache.get(v)
        if h is None:
            h = cache[v] = stable_id(field, v)
        out[i] = h
    return out


# -- features --------------------------------------------------------------------------------------

def _age_bucket(age: str) -> str:
    try:
        return str(int(np.searchsorted(_AGE_EDGES, int(age), side="right")))
    except ValueError:
        return "unknown"


def _year_bucket(year: str) -> str:
    try:
        y = int(year)
    except ValueError:
        return "unknown"
    return str(y // 10 * 10) if y < 1980 else str(y // 5 * 5)  # most movies are recent


def _single(ids: np.ndarray) -> Field:
    return Field(ids.reshape(-1, 1), np.ones((ids.shape[0], 1), dtype=np.float32))


def load(data_dir: str | None = None, split: str = "user", test_fraction: float = 0.2) -> Dataset:
    """Read the three files, build every field of :data:`FIELDS`, sort by time, split
    (see :func:`split_rows`).

    Raises DatasetMissingError if the files are not installed (see :func:`find_data_dir`).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data_dir = data_dir or find_data_dir()
    _, inter = _read_table(os.path.join(data_dir, "ml-100k.inter"))
    uh, users = _read_table(os.path.join(data_dir, "ml-100k.user"))
    ih, items = _read_table(os.path.join(data_dir, "ml-100k.item"))

    user_cols = {row[0]: dict(zip(uh, row)) for row in users}
    item_cols = {row[0]: dict(zip(ih, row)) for row in items}

    inter_arr = np.array(inter, dtype=object)
    timestamps = inter_arr[:, 3].astype(np.float64).astype(np.int64)
    order = np.argsort(timestamps, kind="stable")
    inter_arr = inter_arr[order]
    timestamps = timestamps[order]
    user_of = [str(u) for u in inter_arr[:, 0]]
    item_of = [str(i) for i in inter_arr[:, 1]]
    labels = (inter_arr[:, 2].astype(np.float64) >= 4).astype(np.float32)
    n = len(user_of)

    def user_attr(col: str, fn=lambda v: v) -> list[str]:
        return [fn(user_cols.get(u, {}).get(col, "")) for u in user_of]

    def item_attr(col: str, fn=lambda v: v) -> list[str]:
        return [fn(item_cols.get(i, {}).get(col, "")) for i in item_of]

    user = _hash_values("user", user_of)
    item = _hash_values("item", item_of)
    occupation = _hash_values("occupation", user_attr("occupation"))
    gender = _hash_values("gender", user_attr("gender"))
    age = _hash_values("age", user_attr("age", _age_bucket))
    zip_full = _hash_values("zip", user_attr("zip_code"))
    zip3 = _hash_values("zip3", user_attr("zip_code", lambda z: z[:3]))
    year = _hash_values("year", item_attr("release_year", _year_bucket))

    # Genres: a padded (n, width) matrix of genre ids with mean-pooling weights.
    genre_lists = [g.split() or ["unknown"] for g in item_attr("class")]
    width = max(len(g) for g in genre_lists)
    genre = np.zeros((n, width), dtype=_U64)
    weights = np.zeros((n, width), dtype=np.float32)
    genre_cache: dict[str, int] = {}
    for r, gs in enumerate(genre_lists):
        for c, g in enumerate(gs):
            h = genre_cache.get(g)
            if h is None:
                h = genre_cache[g] = stable_id("genre", g)
            genre[r, c] = h
        weights[r, :len(gs)] = 1.0 / len(gs)
    valid = weights > 0

    def genre_cross(name: str, other: np.ndarray) -> Field:
        ids = cross_ids(name, other[:, None], genre)
        return Field(np.where(valid, ids, _U64(0)), weights)

    fields = {
        "user": _single(user), "item": _single(item), "occupation": _single(occupation),
        "gender": _single(gender), "age": _single(age), "zip": _single(zip_full),
        "zip3": _single(zip3), "genre": Field(genre, weights), "year": _single(year),
        "user_x_genre": genre_cross("user_x_genre", user),
        "item_x_age": _single(cross_ids("item_x_age", item, age)),
        "item_x_gender": _single(cross_ids("item_x_gender", item, gender)),
        "occupation_x_genre": genre_cross("occupation_x_genre", occupation),
        "age_x_genre": genre_cross("age_x_genre", age),
    }
    assert tuple(fields) == FIELDS
    train, test = split_rows(user, split, test_fraction)
    return Dataset(fields, labels, timestamps, train, test, split)


# -- metric ----------------------------------------------------------------------------------------

def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney statistic with average ranks for tied scores.

    Raises ValueError unless both classes are present.
    """
    labels = np.asarray(labels).reshape(-1) > 0.5
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # Ranks 1..n, then every run of equal scores gets the mean rank of the run.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], sorted_scores.size]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
