"""Bad input: hypothesis drives get/put/add/commit/rollback/reopen against an in-memory model.

Every call gets random IDs (known, unknown, duplicated, negative, int64 extremes, beyond
int64, floats, empty) and random values (right or wrong shape, NaN/inf, overflow, int,
float64, strings). The model works out which of the spec's errors apply; the store must
then raise one of them (an ``EmbeddingStoreError`` that is also that builtin) and change
nothing, or, if none applies, do exactly what the model does. After every step the whole
table (IDs in row order and every row) must equal the model.
"""

from __future__ import annotations

import shutil
import tempfile

import numpy as np
import pytest
import torture_lib as tl
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import lmdb_embeddings as le

pytestmark = pytest.mark.torture

DIM = 3
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
INITIAL_IDS = [0, 5, -7, 3, 10**12, I64_MIN + 1, 42, -1, 99, 1000, 7, 8]
EXAMPLES = tl.knob("fuzz_examples", 60, 600)
# L1 holds 2 of the table's 3+ chunks and there is no L2: calls over more chunks evict, puts spill
TINY_CACHE = {"cache_mb": 1e-4}
STEPS = tl.knob("fuzz_steps", 25, 50)
_tally = {"calls": 0, "rejected": 0, "applied": 0, "spilled": 0}

# one ID "token": (kind, value); the kind decides which error the model expects
unknown_ints = st.integers(I64_MIN, I64_MAX)
known = st.tuples(st.just("known"), st.integers(0, 10**6))  # index into the model's IDs
token = st.one_of(
    known,
    st.tuples(st.just("int"), unknown_ints),  # unknown unless it happens to be in the model
    st.tuples(st.just("int"), st.sampled_from([I64_MIN, I64_MAX, -1, 0, 2**62])),
    st.tuples(st.just("outofrange"), st.sampled_from([2**63, 2**64 + 3, -(2**63) - 1, 2**70])),
    st.tuples(st.just("float"), st.sampled_from([1.5, -0.5, 3.0, float("nan")])),
)
id_lists = st.one_of(st.lists(known, max_size=8), st.lists(token, max_size=6))  # half the calls: known IDs
new_id_lists = st.one_of(st.lists(st.tuples(st.just("int"), unknown_ints), max_size=5), st.lists(token, max_size=5))
value_kind = st.sampled_from(["good"] * 10 + ["int", "float64", "wrong_rows", "wrong_cols",
                              "one_d", "nan", "inf", "overflow", "strings"])


class StoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="torture-fuzz-")
        self.path = self.dir + "/store"
        init = np.arange(len(INITIAL_IDS) * DIM, dtype=np.float32).reshape(-1, DIM)
        self.store = le.EmbeddingStore.create(self.path, INITIAL_IDS, DIM, init=init, chunk_rows=4, **TINY_CACHE)
        self.order = list(INITIAL_IDS)  # the model: IDs in row order and their rows
        self.rows = {i: init[k].copy() for k, i in enumerate(INITIAL_IDS)}
        self.committed = (list(self.order), {k: v.copy() for k, v in self.rows.items()})

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---------------------------------------------------------------- helpers
    def materialize(self, tokens):
        """Python ID list for the tokens, and the set of errors their kinds call for."""
        ids, errors = [], set()
        for kind, value in tokens:
            if kind == "known":
                ids.append(self.order[value % len(self.order)])
            else:
                ids.append(value)
                if kind == "outofrange":
                    errors |= {ValueError, KeyError}
                elif kind == "float":
                    errors |= {TypeError, ValueError}
        return ids, errors

    def values_for(self, n, kind, data):
        base = np.asarray(data.draw(st.lists(st.floats(-100, 100, width=32), min_size=n * DIM, max_size=n * DIM)),
                          np.float32).reshape(n, DIM)
        if kind == "int":
            return base.astype(np.int32), set()
        if kind == "float64":
            return base.astype(np.float64), set()
        if kind == "wrong_rows":
            return np.zeros((n + 1, DIM), np.float32), {ValueError}
        if kind == "wrong_cols":
            return np.zeros((n, DIM + 1), np.float32), {ValueError}
        if kind == "one_d":
            return np.zeros(n * DIM, np.float32), {ValueError}
        if kind in ("nan", "inf", "overflow"):
            if n == 0:
                return base, set()
            bad = base.astype(np.float64)
            bad[data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, DIM - 1))] = {
                "nan": np.nan, "inf": -np.inf, "overflow": 1e300}[kind]
            return bad, {ValueError}
        if kind == "strings":
            return np.full((n, DIM), "x"), {TypeError, ValueError}
        return base, set()

    def expect(self, call, errors):
        """Run ``call``; raise of an expected kind and no change, or success when none is expected."""
        _tally["calls"] += 1
        before = (list(self.order), {k: v.copy() for k, v in self.rows.items()})
        try:
            result = call()
        except le.EmbeddingStoreError as exc:
            assert errors, f"unexpected {type(exc).__name__}: {exc}"
            assert isinstance(exc, tuple(errors)), f"{type(exc).__name__} ({exc}) is none of {errors}"
            assert str(exc), "an error without a message"
            _tally["rejected"] += 1
            self.check_table(before)
            return None
        assert not errors, f"the call succeeded although {errors} was expected"
        _tally["applied"] += 1
        return result

    def check_table(self, model=None):
        order, rows = model or (self.order, self.rows)
        assert self.store.ids.tolist() == order
        assert len(self.store) == len(order)
        if order:
            want = np.stack([rows[i] for i in order])
            assert np.array_equal(self.store.get(np.asarray(order, np.int64)), want)

    # ------------------------------------------------------------------ rules
    @rule(tokens=id_lists, data=st.data())
    def get(self, tokens, data):
        ids, errors = self.materialize(tokens)
        if not errors and any(i not in self.rows for i in ids):
            errors.add(KeyError)
        got = self.expect(lambda: self.store.get(ids), errors)
        if got is not None:
            assert got.shape == (len(ids), DIM) and got.dtype == np.float32
            for k, i in enumerate(ids):
                assert np.array_equal(got[k], self.rows[i])

    @rule(tokens=id_lists, kind=value_kind, data=st.data())
    def put(self, tokens, kind, data):
        ids, errors = self.materialize(tokens)
        values, value_errors = self.values_for(len(ids), kind, data)
        errors |= value_errors
        if len(set(map(repr, ids))) != len(ids):
            errors.add(ValueError)
        if not errors and any(i not in self.rows for i in ids):
            errors.add(KeyError)
        if self.expect(lambda: self.store.put(ids, values), errors) is None and not errors:
            for k, i in enumerate(ids):
                self.rows[i] = np.asarray(values[k], np.float32)

    @rule(tokens=new_id_lists, kind=value_kind, default=st.booleans(), data=st.data())
    def add(self, tokens, kind, default, data):
        ids, errors = self.materialize(tokens)
        values, value_errors = (None, set()) if default else self.values_for(len(ids), kind, data)
        errors |= value_errors
        if len(set(map(repr, ids))) != len(ids) or any(i in self.rows for i in ids if isinstance(i, int)):
            errors.add(ValueError)
        self.expect(lambda: self.store.add(ids, values), errors)
        if not errors:
            for k, i in enumerate(ids):
                self.order.append(i)
                self.rows[i] = np.zeros(DIM, np.float32) if values is None else np.asarray(values[k], np.float32)
                if values is None:  # the default is the store's init ("normal", seeded): take it as read
                    self.rows[i] = self.store.get([i])[0]

    @rule()
    def commit(self):
        self.store.commit()
        self.committed = (list(self.order), {k: v.copy() for k, v in self.rows.items()})

    @rule()
    def rollback(self):
        self.store.rollback()
        self.order, self.rows = list(self.committed[0]), {k: v.copy() for k, v in self.committed[1].items()}

    @rule(readonly_check=st.booleans())
    def reopen(self, readonly_check):
        """close() commits; a fresh handle (read-only or not) must see exactly the model."""
        self.store.close()
        self.committed = (list(self.order), {k: v.copy() for k, v in self.rows.items()})
        if readonly_check:
            with le.EmbeddingStore.open(self.path, readonly=True, **TINY_CACHE) as reader:
                assert reader.ids.tolist() == self.order
        self.store = le.EmbeddingStore.open(self.path, **TINY_CACHE)

    @invariant()
    def table_matches_model(self):
        _tally["spilled"] += self.store.stats()["spilled_chunks"]
        self.check_table()


StoreMachine.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                                          suppress_health_check=list(HealthCheck), derandomize=tl.SCALE == "ci")


def test_store_against_model():
    _tally.update(calls=0, rejected=0, applied=0, spilled=0)
    try:
        StoreMachine.TestCase().runTest()
        assert _tally["spilled"] > 0, "the tiny cache never spilled: the machine did not exercise the spill path"
    finally:
        tl.record("fuzz: get/put/add against a model", fuzz_cases=_tally["calls"], clean_errors=_tally["rejected"],
                  applied_exactly=_tally["applied"])


def test_ids_beyond_int64_are_a_value_error_even_mixed_with_negatives(tmp_path):
    """Regression (found by the state machine): numpy reads [-1, 2**63] as float64, and the
    error used to say the IDs were floats."""
    with le.EmbeddingStore.create(str(tmp_path / "s"), 10, 2) as store:
        for ids in ([-1, 2**63], [2**64], [3, -(2**63) - 1]):
            with pytest.raises(ValueError, match="outside the int64 range"):
                store.get(ids)
        with pytest.raises(TypeError, match="integers"):
            store.get([1.5])
