"""One model across parallel replicas: which variables a model kind shares, and their deltas by item id.

At parallelism p the job runs p replicas of the model, each serving the users of its shard. Users' own
state (user rows, histories, seen sets) stays with the replica that serves them. What every user's
lists read, the item side, is *shared*: each replica trains its copy on its own users' events and
every so often exports what changed, which the other replicas add to theirs (docs/ARCHITECTURE.md).

A model kind declares its variables as :class:`Var` (:meth:`TableModel.variables`): rows of the item
table (embeddings, biases, optimizer accumulators), rows of the user table (per-user, never shared),
dense tensors, and counts over pairs of items (``[m * m]`` over the first ``m`` item rows). The sync
is generic over these kinds, so a new model kind gets parallel training by declaring its variables.

Why deltas add up: every replica gives an item's rows the same initial values (:func:`id_rows`, drawn
from the seed and the id alone), so a shared row is its initial value plus the updates of every
replica. :class:`SyncBase` keeps each shared variable as of the last export plus what was received
since; the difference is this replica's own updates, exported by item *id* (replicas number their
rows differently) and added by the others. Sums of SGD or Adagrad updates made from slightly stale
parameters are what asynchronous data-parallel training does (Hogwild, parameter servers); counts add
exactly.
"""
from __future__ import annotations

import base64
import io
import json
import zlib
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import is_not
from typing import NamedTuple, Sequence

import numpy as np

# Model kinds whose replicas learn as one model at parallelism > 1: they declare their variables (below). The
# baselines' replicas stay apart (each subtask's users, a model of their own).
SYNCED_KINDS = ("bpr", "sequence")
ROWS_OF = ("items", "users")
KINDS = ("items", "users", "dense", "item_pairs")
DELTA_MAGIC = b"#FSD1"     # a delta's bytes (SharedDelta.to_bytes) begin with this ("#": never base64 text)


class Var(NamedTuple):
    """One variable of a model: ``kind`` says whose it is (item rows, user rows, dense, item-pair counts).

    Rows of a table that no id holds have the value ``fill``; a row handed to an id starts at ``fill``,
    or with ``std > 0`` at N(0, std) drawn from (seed, ``name``, id), the same on every replica. ``local``: item
    rows or a dense tensor that each replica keeps to itself, never synced: an optimizer's state (Adagrad's
    accumulators), so that each replica sizes its steps by the gradients it computes itself.
    """
    name: str
    var: object            # a tf.Variable (models/ never needs more than .numpy(), sparse_read and the scatters)
    kind: str
    fill: float = 0.0
    std: float = 0.0
    local: bool = False

    @property
    def shared(self) -> bool:
        return self.kind != "users" and not self.local


def id_rows(seed: int, name: str, ids: Sequence[str], tail: Sequence[int], fill: float, std: float) -> np.ndarray:
    """The initial rows of ``ids`` for variable ``name``: ``fill``, or N(0, std) from (seed, name, id) alone.

    >>> a = id_rows(7, "E", ["x", "y"], [3], 0.0, 0.1); b = id_rows(7, "E", ["y"], [3], 0.0, 0.1)
    >>> bool((a[1] == b[0]).all()), a.shape, id_rows(7, "acc", ["x"], [], 0.5, 0.0).tolist()
    (True, (2, 3), [0.5])
    """
    tail = tuple(int(t) for t in tail)
    if std <= 0:
        return np.full((len(ids),) + tail, fill, np.float32)
    tag = zlib.crc32(name.encode())
    return np.stack([np.random.default_rng([seed, tag, zlib.crc32(str(i).encode())]).normal(0.0, std, tail)
                     for i in ids]).astype(np.float32) if len(ids) else np.zeros((0,) + tail, np.float32)


@dataclass
class SharedDelta:
    """What one replica's own updates changed in the shared variables since its last export, by item id.

    ``rows[name]``: (positions in ``ids``, the rows' changes); ``dense[name]``: the change; ``pairs[name]``:
    (positions of the first and second item in ``ids``, the changes of their counts).
    """
    ids: list[str] = field(default_factory=list)
    rows: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    dense: dict[str, np.ndarray] = field(default_factory=dict)
    pairs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return (not any(len(at) for at, _ in self.rows.values()) and not any(len(v) for *_, v in self.pairs.values())
                and not any(np.any(v) for v in self.dense.values()))

    def to_bytes(self) -> bytes:
        """Named arrays as the sync topic carries them (no pickles): ``#FSD1``, a line of JSON naming each array's
        key, dtype and shape (padded to 8 bytes), then their bytes in that order, each padded to 8 bytes. The
        ids are their UTF-8 text, each followed by a NUL (one encode and one split for them all), or where an id
        holds a NUL, their bytes and where each ends. Not compressed here (the sync topic's producer compresses
        with lz4, in librdkafka's thread)."""
        text = "\0".join(self.ids) + "\0" if self.ids else ""
        if text.count("\0") == len(self.ids):
            arrays = {"ids.nul": np.frombuffer(text.encode(), np.uint8)}
        else:
            encoded = [i.encode() for i in self.ids]
            arrays = {"ids.utf8": np.frombuffer(b"".join(encoded), np.uint8),
                      "ids.ends": np.cumsum([len(e) for e in encoded], dtype=np.int64)}
        for name, (at, values) in self.rows.items():
            arrays[f"rows.{name}.at"], arrays[f"rows.{name}.values"] = at, values
        for name, values in self.dense.items():
            arrays[f"dense.{name}"] = values
        for name, (first, second, values) in self.pairs.items():
            arrays[f"pairs.{name}.first"], arrays[f"pairs.{name}.second"] = first, second
            arrays[f"pairs.{name}.values"] = values
        arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        # An .npz until stop 34: its zip members took 5x the time to write and read (a sequence replica's sync
        # on ML-1M), and before that deflated (stop 27). Both are still read (deltas on the topic from before).
        header = json.dumps([[k, v.dtype.str, list(v.shape)] for k, v in arrays.items()], separators=(",", ":"))
        header = header.encode() + b" " * (-(len(DELTA_MAGIC) + len(header) + 1) % 8)    # the arrays 8-aligned
        parts = [DELTA_MAGIC, header, b"\n"]
        for v in arrays.values():
            parts += [v.tobytes(), b"\0" * (-v.nbytes % 8)]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> "SharedDelta":
        """The delta :meth:`to_bytes` wrote (or an earlier version's ``.npz``, deflated or not).

        >>> d = SharedDelta(["a", "b"], {"E": (np.array([1]), np.ones((1, 2), np.float32))}, {"theta": np.ones(1)},
        ...                 {"T": (np.array([0]), np.array([1]), np.array([2.0], np.float32))})
        >>> e = SharedDelta.from_bytes(d.to_bytes()); e.ids, e.rows["E"][1].tolist(), e.pairs["T"][2].tolist(), e.empty
        (['a', 'b'], [[1.0, 1.0]], [2.0], False)
        >>> SharedDelta.from_bytes(SharedDelta([], {}, {"theta": np.zeros(1)}).to_bytes()).ids
        []
        >>> [SharedDelta.from_bytes(SharedDelta(ids, {}, {}).to_bytes()).ids for ids in (["", "é\\nx", "z"], ["a\\0b", ""])]
        [['', 'é\\nx', 'z'], ['a\\x00b', '']]
        >>> old = io.BytesIO(); np.savez(old, **{"ids": np.array(["a"]), "rows.E.at": np.array([0]),
        ...                                      "rows.E.values": np.ones((1, 2), np.float32)})
        >>> [SharedDelta.from_bytes(b).rows["E"][1].tolist() for b in (old.getvalue(), zlib.compress(old.getvalue()))]
        [[[1.0, 1.0]], [[1.0, 1.0]]]
        """
        if data.startswith(DELTA_MAGIC):
            head_end = data.index(b"\n", len(DELTA_MAGIC))
            z, offset = {}, head_end + 1
            for key, dtype, shape in json.loads(data[len(DELTA_MAGIC):head_end]):
                count = int(np.prod(shape, dtype=np.int64))
                z[key] = np.frombuffer(data, dtype, count, offset).reshape(shape)
                size = count * np.dtype(dtype).itemsize
                offset += size + -size % 8
            return cls._from_arrays(z)
        if not data.startswith(b"PK"):      # deflated: written by an earlier version's job (on the sync topic still)
            data = zlib.decompress(data)
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls._from_arrays({key: z[key] for key in z.files})

    @classmethod
    def _from_arrays(cls, z: dict[str, np.ndarray]) -> "SharedDelta":
        if "ids.nul" in z:
            out = cls(z["ids.nul"].tobytes().decode().split("\0")[:-1])
        elif "ids.utf8" in z:
            text, ends = z["ids.utf8"].tobytes(), z["ids.ends"].tolist()
            out = cls([text[a:b].decode() for a, b in zip([0] + ends, ends)])
        else:
            out = cls([str(i) for i in z["ids"]])
        for key in z:
            part, _, rest = key.partition(".")
            name, _, leaf = rest.rpartition(".") if part != "dense" else (rest, "", "")
            if part == "rows" and leaf == "at":
                out.rows[name] = (z[key], z[f"rows.{name}.values"])
            elif part == "dense":
                out.dense[name] = z[key]
            elif part == "pairs" and leaf == "first":
                out.pairs[name] = (z[key], z[f"pairs.{name}.second"], z[f"pairs.{name}.values"])
        return out


class SyncBase:
    """The shared variables as of the last export, plus every delta applied since (numpy copies).

    :meth:`export` returns the difference to the current values (this replica's own updates) and moves
    the base to them; :meth:`received` adds another replica's delta to the base as it is added to the
    variables, so it is never sent back. Rows that no id holds are at their ``fill`` in both.
    """

    def __init__(self, variables: Sequence[tuple[Var, np.ndarray]]):
        self.base = {v.name: np.array(values, np.float32) for v, values in variables}
        # Item-row variables whose changed rows the model reports (:meth:`touch`), each with a mask of its rows that
        # may have changed since the last export (touched, or held back by it): an export reads and compares only
        # those. The others are read and compared whole.
        self.dirty: dict[str, np.ndarray] = {}

    def track(self, names: Sequence[str]) -> None:
        """From now on the model reports every row of the item-row variables ``names`` that it changes."""
        for name in names:
            self.dirty.setdefault(name, np.zeros(0, bool))

    def touch(self, names: Sequence[str], rows) -> None:
        """Rows of the variables ``names`` that may have changed since the last export (untracked ones: compared
        whole anyway)."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        if not len(rows):
            return
        for name in names:
            mask = self.dirty.get(name)
            if mask is None:
                continue
            if len(mask) <= rows.max():
                mask = self.dirty[name] = np.concatenate([mask, np.zeros(max(int(rows.max()) + 1, 2 * len(mask))
                                                                         - len(mask), bool)])
            mask[rows] = True

    def read(self, v: Var) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """What :meth:`export` compares of the item-row variable ``v``: its values, or when it is tracked the rows
        that may have changed since the last export and their values (read from the variable at those rows)."""
        mask = self.dirty.get(v.name)
        if mask is None:
            return v.var.numpy()
        rows = np.flatnonzero(mask[: int(v.var.shape[0])])
        mask[:] = False
        return rows, (v.var.sparse_read(rows).numpy() if len(rows) else
                      np.zeros((0,) + tuple(v.var.shape[1:]), np.float32))

    def fit(self, v: Var, shape: Sequence[int]) -> np.ndarray:
        """The base of ``v``, grown as the variable grew to ``shape`` (pair counts as an ``[m, m]`` matrix)."""
        base = self.base[v.name]
        if base.shape[0] < shape[0]:
            if v.kind == "item_pairs":
                m0, m = _side(base.shape[0]), _side(int(shape[0]))
                grown = np.zeros((m, m), np.float32)
                grown[:m0, :m0] = base.reshape(m0, m0)
                base = grown.reshape(-1)
            else:
                pad = np.full((shape[0] - base.shape[0],) + tuple(shape[1:]), v.fill, np.float32)
                base = np.concatenate([base, pad])
            self.base[v.name] = base
        return base

    def export(self, variables: Sequence[tuple[Var, object]], row_ids: Sequence[str | None],
               min_change: float = 0.0) -> SharedDelta:
        """This replica's updates since the last export, by item id (rows that no id holds are left out).

        ``variables``: each shared variable with its current values (item rows: what :meth:`read` returns, all
        of them or only the rows that may have changed); for pair counts, the (first, second) item rows of the
        cells changed since the last export and their values now (the counts are items^2 floats: the model
        tracks what it counted rather than have them compared whole). ``min_change`` > 0: a row of an item-row
        variable goes out only once one of its values moved more than that since it last went out; the rest
        stays in the difference to the base, for a later export (counts and dense always go).
        """
        n = len(row_ids)
        delta, changed, pairs = SharedDelta(), {}, {}
        for v, values in variables:
            if v.kind == "item_pairs":
                first, second, now = (np.asarray(a) for a in values)
                base = self.fit(v, v.var.shape)
                m = _side(len(base))
                cells = first.astype(np.int64) * m + second.astype(np.int64)
                change = now.astype(np.float32) - base[cells]
                base[cells] = now
                moved = change != 0
                pairs[v.name] = (first[moved].astype(np.int64), second[moved].astype(np.int64), change[moved])
                continue
            if v.kind == "dense":
                values = np.asarray(values, np.float32)
                base = self.fit(v, values.shape)
                delta.dense[v.name] = values - base
                self.base[v.name] = values.copy()
                continue
            base = self.fit(v, v.var.shape)
            if isinstance(values, tuple):          # the rows that may have changed (tracked), and their values
                at, values = values
                inside = at < n
                at, values = at[inside], np.asarray(values, np.float32)[inside]
            else:
                values = np.asarray(values, np.float32)[:n]
                at = np.arange(len(values))
            change = np.abs(values - base[at]).reshape(len(at), int(np.prod(base.shape[1:], dtype=np.int64)))
            out = np.any(change > min_change, axis=1)
            if v.name in self.dirty:               # held back: compared again at the next export
                self.touch([v.name], at[~out & np.any(change > 0, axis=1)])
            rows, values = at[out], values[out]
            changed[v.name] = (rows, values - base[rows])
            base[rows] = values
        sent = np.zeros(n, bool)                            # rows with a change that goes out (a mask: no sort)
        for at in [r for r, _ in changed.values()] + [a for p in pairs.values() for a in p[:2]]:
            sent[at[at < n]] = True
        rows = np.flatnonzero(sent)
        ids = list(map(row_ids.__getitem__, rows.tolist()))             # (maps and compress: loops in C)
        held = np.fromiter(map(is_not, ids, repeat(None)), bool, len(ids))
        rows, delta.ids = rows[held], list(compress(ids, held))         # a row that no id holds is never sent
        position = np.full(n, -1, np.int64)                 # item row -> its place in delta.ids
        position[rows] = np.arange(len(rows))
        for name, (at, change) in changed.items():
            keep = position[at] >= 0
            delta.rows[name] = (position[at[keep]].astype(np.int32), change[keep])
        for name, (first, second, change) in pairs.items():
            inside = (first < n) & (second < n)
            first, second, change = first[inside], second[inside], change[inside]
            keep = (position[first] >= 0) & (position[second] >= 0)
            delta.pairs[name] = (position[first[keep]].astype(np.int32), position[second[keep]].astype(np.int32),
                                 change[keep])
        return delta

    def received(self, v: Var, at: np.ndarray | None, values: np.ndarray, distinct: bool) -> None:
        """Another replica's change ``values`` was added to ``v`` at ``at`` (rows; flat cells for pair counts;
        ``None`` for a dense variable). ``distinct``: ``at`` has no row twice (known once per delta)."""
        base = self.fit(v, v.var.shape)
        if at is None:
            base += values
        elif distinct:                          # as a rule (a delta has each id once): 8x np.add.at's speed
            base[at] += values
        else:                                   # two ids on one row (evicted for the other while applying)
            np.add.at(base, at, values)

    def forget(self, v: Var, rows: Sequence[int]) -> None:
        """Rows of ``v`` were reset to ``fill`` here because their id left this replica: not a change to send
        (pair counts: the rows' counts both ways, reset to 0)."""
        base = self.fit(v, v.var.shape)
        if v.kind == "item_pairs":
            m = _side(len(base))
            rows = [r for r in rows if r < m]
            square = base.reshape(m, m)
            square[rows, :] = 0.0
            square[:, rows] = 0.0
        else:
            base[[r for r in rows if r < len(base)]] = v.fill


def parse_life(text: str) -> tuple[int, int]:
    """A life as records carry it, ``<job build time ms>.<attempt>``, in the order lives follow one another.

    >>> parse_life("1700000000000.2") < parse_life("1700000000000.10") < parse_life("1700000000001.0")
    True
    """
    job, _, attempt = text.partition(".")
    return int(job), int(attempt or 0)


class SyncRecord(NamedTuple):
    """One delta of a replica as it travels on the sync topic, one record: a line of text and the delta's bytes,
    ``<run> <sender> <seq> <sent_at ms> <upto> <progress> <life> <base> <delta>`` (:meth:`SharedDelta.to_bytes`;
    base64 text of an npz until stop 34, still read). ``run``: the
    exchange it belongs to (replicas started from scratch together share one); ``upto``: the last
    ``window_end`` the sender had learned, so the delta holds events before it only; ``progress``: the sender
    has learned every window of its own that ends before it (its watermark, for the last call of a timer);
    ``life``: the sender's life (the job's build time and the task's attempt: a failover or a resume starts
    a new one, which every replica restored with it shares); ``base``: how many deltas the sender had sent
    when its life began (its restored count). A *marker* (``seq == base``, no payload) opens a life."""
    run: str
    sender: int
    seq: int
    sent_at: int
    upto: int
    progress: int
    life: tuple[int, int]
    base: int
    data: bytes

    @classmethod
    def parse(cls, data: bytes | str) -> "SyncRecord":
        data = data.encode() if isinstance(data, str) else data
        run, sender, seq, sent_at, upto, progress, life, base, _ = data.split(b" ", 8)
        return cls(run.decode(), int(sender), int(seq), int(sent_at), int(upto), int(progress),
                   parse_life(life.decode()), int(base), data)

    @property
    def marker(self) -> bool:
        return self.seq == self.base

    def payload(self) -> bytes:
        """The delta's bytes. Carried as they are since stop 34: base64 cost the sender and every reader 1-2 ms a
        delta (ML-1M, sequence, p = 2) and a third more bytes; an earlier version's record holds base64 text."""
        body = self.data.split(b" ", 8)[8]
        return body if body.startswith(DELTA_MAGIC) else base64.b64decode(body)


@dataclass
class ReplicaState:
    """A replica's place in the exchange, kept with its model snapshot: its own key (the sender name of its
    deltas), its exchange (``run``), how many deltas it sent, the last it applied of every other replica's
    (they apply in sequence, each once), the events it learned since it last sent, and where its reading of
    the sync topic goes on (partition -> offset: no delta it has not applied lies before). Not kept: its
    ``life`` and the count it began it with (``base``), set when it is loaded (:meth:`begin`).

    >>> r = ReplicaState(own=2, run="r1"); opening = SyncRecord.parse(r.begin((7, 1), 900))
    >>> opening.marker, opening.life, opening.base
    (True, (7, 1), 0)
    >>> rec = SyncRecord.parse(r.record(DELTA_MAGIC + b" delta", 1000, upto=60000))
    >>> r.sent, rec.sender, rec.seq, rec.sent_at, rec.upto, rec.life, rec.base, rec.marker, rec.payload()
    (1, 2, 1, 1000, 60000, (7, 1), 0, False, b'#FSD1 delta')
    >>> SyncRecord.parse("r1 2 1 1000 60000 60000 7.1 0 " + base64.b64encode(b"PK old").decode()).payload()
    b'PK old'
    >>> ReplicaState.from_text(r.to_text()).sent == r.sent
    True
    """
    own: int
    run: str = ""
    sent: int = 0
    applied: dict[int, int] = field(default_factory=dict)
    unsent_events: int = 0
    positions: dict[int, int] = field(default_factory=dict)
    life: tuple[int, int] = (0, 0)
    base: int = 0

    def begin(self, life: tuple[int, int], now_ms: int) -> bytes:
        """Start ``life`` from the deltas sent so far; returns the marker that tells the others so."""
        self.life, self.base = tuple(life), self.sent
        return self._record(self.sent, now_ms, 0, 0, b"")

    def record(self, delta: bytes, now_ms: int, upto: int, progress: int | None = None) -> bytes:
        """The next delta of this replica as a sync record (numbered in sequence from 1)."""
        self.sent += 1
        return self._record(self.sent, now_ms, upto, upto if progress is None else progress, delta)

    def _record(self, seq: int, now_ms: int, upto: int, progress: int, delta: bytes) -> bytes:
        return (f"{self.run} {self.own} {seq} {int(now_ms)} {int(upto)} {int(progress)} "
                f"{self.life[0]}.{self.life[1]} {self.base} ").encode() + delta

    def to_text(self) -> str:
        return json.dumps({"own": self.own, "run": self.run, "sent": self.sent, "unsent_events": self.unsent_events,
                           "applied": {str(k): v for k, v in sorted(self.applied.items())},
                           "positions": {str(k): v for k, v in sorted(self.positions.items())}})

    @classmethod
    def from_text(cls, text: str) -> "ReplicaState":
        d = json.loads(text)
        return cls(int(d["own"]), str(d.get("run", "")), int(d["sent"]),
                   {int(k): int(v) for k, v in d["applied"].items()}, int(d.get("unsent_events", 0)),
                   {int(k): int(v) for k, v in d.get("positions", {}).items()})


class SyncInbox:
    """Other replicas' deltas read from the sync topic and not yet applied by one replica (``state``).

    A record joins once: not the replica's own, of its exchange, above what it applied. :meth:`due` hands out
    each sender's deltas in sequence (a gap waits for the missing one) whose events all precede the window
    the replica lists next, so a list never reflects another replica's events after its ``window_end``
    however far ahead that replica is in event time.

    Lives (the junction after a failure): a sender's deltas of an earlier life than the replica's own are
    those it sent before the checkpoint that both restored from (numbered up to the ``base`` it restored
    with: still to be applied) or after it (in the failed life: void, the restored sender makes those calls
    again and sends their deltas again under the same numbers). Which is which is known once the sender's
    marker of the current life is read: until then they wait. (A checkpoint cuts every replica at one
    watermark, and a delta applies only before a call whose windows all end after its ``upto``: so no
    replica applied, before the cut, a delta sent after it.)

    >>> state = ReplicaState(own=1, run="r", life=(5, 0)); inbox = SyncInbox(state)
    >>> other = ReplicaState(own=2, run="r", life=(5, 0)); texts = [other.record(b"d", 0, upto) for upto in (60, 120)]
    >>> [inbox.add(0, offset, t).seq for offset, t in enumerate(texts)], inbox.add(0, 2, texts[0])
    ([1, 2], None)
    >>> [r.seq for r in inbox.due(before=60)], state.applied, inbox.positions({0: 3})
    ([1], {2: 1}, {0: 1})
    """

    def __init__(self, state: ReplicaState):
        self.state = state
        self.waiting: dict[tuple[int, int], tuple[int, int, SyncRecord]] = {}   # (sender, seq) -> (partition, offset, record)
        self.progress: dict[int, int] = {}     # sender -> the highest progress read of it in this life
        self.bases: dict[int, int] = {}        # sender -> the count it began this life (or a later one) with

    def add(self, partition: int, offset: int, record: bytes | str) -> SyncRecord | None:
        """Keep a record read at ``partition``/``offset`` (returned) unless it is not for this replica, a copy,
        a marker or void."""
        rec = SyncRecord.parse(record)
        if rec.run != self.state.run or rec.sender == self.state.own:
            return None
        current = rec.life >= self.state.life
        if current:
            self.progress[rec.sender] = max(self.progress.get(rec.sender, rec.progress), rec.progress)
            if rec.sender not in self.bases:
                self._opened(rec.sender, rec.base)
        if rec.marker or rec.seq <= self.state.applied.get(rec.sender, 0) or not (current or self._valid(rec)):
            return None
        key = (rec.sender, rec.seq)
        if key in self.waiting and self.waiting[key][2].life >= rec.life:
            return None
        self.waiting[key] = (partition, offset, rec)
        return rec

    def _valid(self, rec: SyncRecord) -> bool:
        """For a delta of an earlier life: sent before the checkpoint (True), or not known yet (True: it waits)."""
        base = self.bases.get(rec.sender)
        return base is None or rec.seq <= base

    def _opened(self, sender: int, base: int) -> None:
        """``sender``'s current life began at ``base``: its waiting deltas of earlier lives above it are void."""
        self.bases[sender] = base
        for key in [k for k, (_, _, r) in self.waiting.items()
                    if r.sender == sender and r.life < self.state.life and r.seq > base]:
            del self.waiting[key]

    def due(self, before: int):
        """Each sender's next deltas in sequence with ``upto <= before``, marked applied as they are handed out
        (a delta of an earlier life only once the sender's current life has said where it began)."""
        for sender in sorted({s for s, _ in self.waiting}):
            seq = self.state.applied.get(sender, 0) + 1
            while ((entry := self.waiting.get((sender, seq))) is not None and entry[2].upto <= before
                   and (entry[2].life >= self.state.life or sender in self.bases)):
                del self.waiting[(sender, seq)]
                self.state.applied[sender] = seq
                yield entry[2]
                seq += 1

    def take(self, sender: int, seq: int) -> SyncRecord | None:
        """A given delta (a restore re-applying what its log says), marked applied."""
        entry = self.waiting.pop((sender, seq), None)
        if entry is not None:
            self.state.applied[sender] = seq
        return entry and entry[2]

    def positions(self, read: dict[int, int]) -> dict[int, int]:
        """Where to read again to see every delta not applied yet: ``read`` (partition -> offset after the last
        record read), moved back to the first record still waiting."""
        out = dict(read)
        for partition, offset, _ in self.waiting.values():
            out[partition] = min(out.get(partition, offset), offset)
        return out


SEED_PART_CHARS = 16 << 20     # a seed's text per sync record (the topic takes records of up to 64 MiB)


def seed_records(source: ReplicaState, positions: dict[int, int], model: bytes,
                 part_chars: int = SEED_PART_CHARS) -> list[str]:
    """A whole replica as sync records, the *seed* of a replica new at a larger parallelism (a rescale): its
    model (``to_bytes``) and its place in the exchange, sent by ``source`` right after a send, so the copy's
    model is its sync base. ``positions``: where the source's unapplied deltas lie on the topic. In parts of
    ``part_chars``: ``seed <source> <life> <part> <parts> <text>``; a sync record never begins with "seed".

    >>> src = ReplicaState(own=0, run="r", sent=3, applied={5: 2}, life=(9, 0))
    >>> texts = seed_records(src, {0: 40}, b"model bytes", part_chars=8)
    >>> seeds = SeedParts(); _ = [seeds.add(t) for t in reversed(texts)]
    >>> state, model = seeds.take(0, (9, 0), own=7)
    >>> model, state.own, state.run, state.sent, state.applied, state.positions
    (b'model bytes', 7, 'r', 0, {5: 2, 0: 3}, {0: 40})
    >>> seeds.take(0, (9, 1), own=7) is None       # another life's seed: not this one's
    True
    >>> seeds.drop(0); seeds.take(0, (9, 0), own=8) is None
    True
    """
    meta = json.dumps({"run": source.run, "sent": source.sent, "applied": {str(k): v for k, v in source.applied.items()},
                       "positions": {str(k): v for k, v in positions.items()}})
    text = f"{base64.b64encode(meta.encode()).decode('ascii')}.{base64.b64encode(model).decode('ascii')}"
    parts = [text[i:i + part_chars] for i in range(0, len(text), part_chars)]
    return [f"seed {source.own} {source.life[0]}.{source.life[1]} {i} {len(parts)} {part}" for i, part in enumerate(parts)]


def is_seed(record: bytes | str) -> bool:
    return record[:5] in (b"seed ", "seed ")


class SeedParts:
    """Seeds read from the sync topic (:func:`seed_records`), by source and life, until one is taken whole."""

    def __init__(self):
        self.parts: dict[tuple[int, tuple[int, int]], dict[int, str]] = {}
        self.counts: dict[tuple[int, tuple[int, int]], int] = {}

    def add(self, text: str) -> None:
        _, source, life, part, parts, chunk = text.split(" ", 5)
        key = (int(source), parse_life(life))
        self.parts.setdefault(key, {})[int(part)] = chunk
        self.counts[key] = int(parts)

    def drop(self, source: int) -> None:
        """Forget ``source``'s seeds (every new replica that needed one has its copy)."""
        for key in [k for k in self.parts if k[0] == int(source)]:
            del self.parts[key], self.counts[key]

    def take(self, source: int, life: tuple[int, int], own: int) -> tuple[ReplicaState, bytes] | None:
        """``source``'s seed of ``life``, once every part is read: the new replica ``own``'s ReplicaState (the
        source's exchange, what it had applied, and the source's own deltas up to the seed as applied: the copy
        holds them) and the model's bytes."""
        key = (int(source), tuple(life))
        parts = self.parts.get(key, {})
        if key not in self.counts or len(parts) < self.counts[key]:
            return None
        meta_text, _, model = "".join(parts[i] for i in range(self.counts[key])).partition(".")
        meta = json.loads(base64.b64decode(meta_text))
        applied = {int(k): int(v) for k, v in meta["applied"].items()}
        applied[int(source)] = int(meta["sent"])
        return (ReplicaState(own=int(own), run=str(meta["run"]), applied=applied,
                             positions={int(k): int(v) for k, v in meta["positions"].items()}),
                base64.b64decode(model))


def _side(n: int) -> int:
    """The side of a flat square matrix of ``n`` cells."""
    return int(round(n ** 0.5))
