"""MovieLens 1M (``::``-separated latin-1 ``.dat``) and 20M (``.csv``) raw readers."""

from __future__ import annotations

import os

import numpy as np

from hstu.data.errors import DataFormatError
from hstu.data.prepare import InteractionBlock, RawSource, file_progress, id_columns, user_id_feature
from hstu.data.processed import ContextualFeature, rating_action_spec
from hstu.data.textio import as_int_ids, iter_numeric_blocks, read_header, require_file

ML1M_AGE_CODES = (1, 18, 25, 35, 45, 50, 56)
ML1M_NUM_OCCUPATIONS = 21
ML20M_RATINGS_HEADER = ["userId", "movieId", "rating", "timestamp"]


def _read_dat_lines(path: str, num_fields: int):
    """Yield (line number, fields) of a small ``::``-separated latin-1 file."""
    require_file(path)
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            text = raw.decode("latin-1").rstrip("\r\n")
            if not text.strip():
                continue
            fields = text.split("::")
            if len(fields) != num_fields:
                raise DataFormatError(path, f"expected {num_fields} fields separated by '::', found {len(fields)}", line_no)
            yield line_no, fields


def _parse_int(path: str, line: int, name: str, value: str) -> int:
    """A non-negative decimal integer (ASCII digits, surrounding blanks allowed)."""
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise DataFormatError(path, f"{name}: {value!r} is not a non-negative integer", line)
    if len(text) > 18:
        raise DataFormatError(path, f"{name}: {text} is too large", line)
    return int(text)


def read_ml1m_movies(path: str) -> dict[int, str]:
    titles = {}
    for line, (movie, title, _genres) in _read_dat_lines(path, 3):
        titles[_parse_int(path, line, "MovieID", movie)] = title
    return titles


def read_ml1m_user_rows(path: str) -> list[tuple[int, tuple[int, int, int], str]]:
    """Every row of ``users.dat`` in file order: (UserID, (gender id, age id, occupation id), zip code text)."""
    rows = []
    for line, (user, gender, age, occupation, zip_code) in _read_dat_lines(path, 5):
        uid = _parse_int(path, line, "UserID", user)
        if gender not in ("F", "M"):
            raise DataFormatError(path, f"Gender: {gender!r} is not F or M", line)
        age_code = _parse_int(path, line, "Age", age)
        if age_code not in ML1M_AGE_CODES:
            raise DataFormatError(path, f"Age: {age_code} is not one of {ML1M_AGE_CODES}", line)
        occ = _parse_int(path, line, "Occupation", occupation)
        if not 0 <= occ < ML1M_NUM_OCCUPATIONS:
            raise DataFormatError(path, f"Occupation: {occ} outside 0..{ML1M_NUM_OCCUPATIONS - 1}", line)
        rows.append((uid, (1 + ("F", "M").index(gender), 1 + ML1M_AGE_CODES.index(age_code), 1 + occ), zip_code.strip()))
    return rows


def read_ml1m_users(path: str) -> dict[int, tuple[int, int, int]]:
    """UserID → (gender id, age id, occupation id); id 0 is reserved for "missing"."""
    return {uid: codes for uid, codes, _zip in read_ml1m_user_rows(path)}


def ml1m_zip_codes(rows: list[tuple[int, tuple[int, int, int], str]]) -> tuple[dict[int, int], list[str]]:
    """UserID → zip code id, and the vocabulary (id → zip code, entry 0 = "<missing>").

    A zip code is kept whole, as the text in ``users.dat`` (``"55117"``, ``"98107-2117"``, leading zeros kept). Ids
    are 1, 2, ... in the order each distinct code first occurs in the file (users without ratings included): the
    ids NVIDIA's example preprocessing gives. An empty field is "missing" (id 0). A UserID listed twice takes its
    last row, as for the other user features.
    """
    ids: dict[str, int] = {}
    users = {}
    for uid, _codes, zip_code in rows:
        if zip_code:
            users[uid] = ids.setdefault(zip_code, len(ids) + 1)
        else:
            users[uid] = 0
    return users, ["<missing>"] + list(ids)


def _ml1m_source(raw_dir: str) -> RawSource:
    ratings = os.path.join(raw_dir, "ratings.dat")
    users_path = os.path.join(raw_dir, "users.dat")
    movies_path = os.path.join(raw_dir, "movies.dat")
    state: dict = {}

    def check():
        for path in (ratings, users_path, movies_path):
            require_file(path)
        # Small files: parse now so a malformed one fails before any output is written.
        rows = read_ml1m_user_rows(users_path)
        state["users"] = {uid: codes for uid, codes, _zip in rows}
        state["zip_codes"], state["zip_vocabulary"] = ml1m_zip_codes(rows)
        state["movies"] = read_ml1m_movies(movies_path)

    def blocks(options):
        with file_progress([ratings], "read ratings.dat", options.show_progress) as bar:
            for block in iter_numeric_blocks(
                ratings, delimiter="::", num_fields=4, columns={"user": 0, "item": 1, "rating": 2, "time": 3},
                skip_header=False, encoding="latin-1", block_bytes=options.block_bytes, progress=bar,
            ):
                rating = as_int_ids(ratings, block, "rating", minimum=1)
                bad = np.flatnonzero(rating > 5)
                if bad.size:
                    raise DataFormatError(ratings, f"Rating {rating[bad[0]]} outside 1..5", block.first_line + int(bad[0]))
                user, item, time = id_columns(ratings, block, options, "user", "item", "time")
                yield InteractionBlock(user=user, item=item, time=time, action=rating - 1)

    def contextual(user_ids):
        table = np.zeros((len(user_ids), 3), dtype=np.int64)
        known = state["users"]
        for row, uid in enumerate(user_ids.tolist()):
            table[row] = known.get(uid, (0, 0, 0))
        zip_codes, zip_vocabulary = state["zip_codes"], state["zip_vocabulary"]
        zip_ids = np.array([zip_codes.get(uid, 0) for uid in user_ids.tolist()], dtype=np.int64)
        return [
            user_id_feature(user_ids),
            ContextualFeature("gender", table[:, 0], 3, ["<missing>", "F", "M"]),
            ContextualFeature("age", table[:, 1], 1 + len(ML1M_AGE_CODES), ["<missing>"] + [str(a) for a in ML1M_AGE_CODES]),
            ContextualFeature(
                "occupation", table[:, 2], 1 + ML1M_NUM_OCCUPATIONS, ["<missing>"] + [str(o) for o in range(ML1M_NUM_OCCUPATIONS)]
            ),
            ContextualFeature("zip_code", zip_ids, len(zip_vocabulary), zip_vocabulary),
        ]

    return RawSource(
        dataset="ml-1m",
        blocks=blocks,
        time_divisor=1,
        action_spec=rating_action_spec(5, "rating - 1 (ratings 1..5 stars)"),
        contextual=contextual,
        extra_metadata={"raw_files": ["ratings.dat", "users.dat", "movies.dat"]},
        check=check,
    )


def _ml20m_source(raw_dir: str) -> RawSource:
    ratings = os.path.join(raw_dir, "ratings.csv")

    def check():
        require_file(ratings)
        header = read_header(ratings, ",")
        if header != ML20M_RATINGS_HEADER:
            raise DataFormatError(ratings, f"header {header} != expected {ML20M_RATINGS_HEADER}", 1)

    def blocks(options):
        with file_progress([ratings], "read ratings.csv", options.show_progress) as bar:
            for block in iter_numeric_blocks(
                ratings, delimiter=",", num_fields=4, columns={"user": 0, "item": 1, "rating": 2, "time": 3},
                skip_header=True, block_bytes=options.block_bytes, progress=bar,
            ):
                half_stars = block.columns["rating"] * 2
                classes = np.rint(half_stars).astype(np.int64)
                bad = np.flatnonzero((classes != half_stars) | (classes < 1) | (classes > 10))
                if bad.size:
                    row = int(bad[0])
                    raise DataFormatError(
                        ratings, f"rating {block.columns['rating'][row]} is not a half-star value in 0.5..5.0", block.first_line + row
                    )
                user, item, time = id_columns(ratings, block, options, "user", "item", "time")
                yield InteractionBlock(user=user, item=item, time=time, action=classes - 1)

    return RawSource(
        dataset="ml-20m",
        blocks=blocks,
        time_divisor=1,
        action_spec=rating_action_spec(10, "2 * rating - 1 (half-star ratings 0.5..5.0)"),
        contextual=lambda user_ids: [user_id_feature(user_ids)],
        extra_metadata={"raw_files": ["ratings.csv"]},
        check=check,
    )


def source(dataset: str, raw_dir: str) -> RawSource:
    return _ml1m_source(raw_dir) if dataset == "ml-1m" else _ml20m_source(raw_dir)
