"""Reading question pickles (the HCRN / DualVGR format's ``{name}_{split}_questions.pt``) from
third parties without trusting them.

A plain ``pickle.load`` runs whatever a crafted file's ``__reduce__`` names, and even numpy's own
reconstruction functions let a file choose a dtype with object fields and fill it from raw bytes
(pointers the file chooses). So the unpickler here

* names only the globals numpy 1 and 2 write for arrays, scalars and dtypes (both spellings,
  ``numpy.core.multiarray`` and ``numpy._core.multiarray``) and the codec protocol-2 pickles use
  for bytes; any other global is refused by name, unimported;
* hands those globals out as inert stand-ins (callables that are no class and take no BUILD state):
  ``_reconstruct``, ``dtype`` and their BUILD states only record what the file says, so BUILD never
  reaches a numpy object; ``_frombuffer`` and ``scalar`` build only from checked dtypes and bytes;
* accepts plain dtypes only: bool, signed and unsigned integers, floats, complex, bytes (``S``) and
  str (``U``), any byte order, and object arrays whose elements are Python ``str`` or ``int``;
  structured dtypes, sub-arrays, metadata, datetimes, void and flags other than the plain type's
  are refused;
* refuses arrays whose declared bytes, summed over the file, exceed the file's size (before anything
  is allocated; a buffer referenced by many arrays counts for each), and an array whose bytes differ
  from those its shape and dtype need;
* then builds the real arrays from the checked bytes (copies, owning their memory).
"""
from __future__ import annotations

import codecs
import pickle
import re
from pathlib import Path

import numpy as np

#: the globals a question pickle may name (numpy 2's spelling; numpy 1's ``numpy.core.`` is mapped)
PICKLE_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode"),
    ("__builtin__", "bytes"), ("builtins", "bytes"),  # protocol 2's empty bytes: bytes()
})

#: the dtype strings numpy writes for the plain kinds: b1, i/u 1 2 4 8, f 2 4 8 (16: long double),
#: c 8 16 (32), S<n>, U<n>, O (object, O8 / O4)
_PLAIN_TYPESTR = re.compile(r"^(?:b1|[iu][1248]|f(?:2|4|8|10|12|16)|c(?:8|16|20|24|32)|[SU]\d{1,9}|O[48]?)$")


class PickleRefused(pickle.UnpicklingError):
    """A question pickle holds something the format does not: the message says what."""


class _Marker:
    """What ``numpy.ndarray`` unpickles to: only a marker for ``_reconstruct``'s first argument. Not a
    class (NEWOBJ refuses it), not callable, no attributes to set, BUILD refused."""

    __slots__ = ()

    def __setstate__(self, state):
        raise PickleRefused("numpy.ndarray takes no state of its own")


_NDARRAY = _Marker()


class _StandIn:
    """An allowed global as the unpickler hands it out: a callable that is no class (so NEWOBJ refuses
    it) and takes no BUILD state (so a file cannot set attributes on anything of this module)."""

    __slots__ = ("_fn", "_name")

    def __init__(self, fn, name: str):
        self._fn, self._name = fn, name

    def __call__(self, *args):
        return self._fn(*args)

    def __setstate__(self, state):
        raise PickleRefused(f"{self._name} takes no state of its own")


class _DtypeStub:
    """``numpy.dtype(typestr, align, copy)`` and its BUILD state, recorded, checked by :meth:`real`."""

    def __init__(self, typestr=None, align=False, copy=True, *rest):
        if rest or not isinstance(typestr, str) or not _PLAIN_TYPESTR.match(typestr):
            raise PickleRefused(f"dtype {typestr!r} is not a plain dtype (bool, int, uint, float, complex, bytes, "
                                f"str, or object holding str / int)")
        self.typestr, self.state, self._real = typestr, None, None

    def __setstate__(self, state):
        self.state = state

    def real(self) -> np.dtype:
        if self._real is not None:
            return self._real
        base = np.dtype(self.typestr)
        st = self.state
        if st is None:
            self._real = base
            return base
        if not isinstance(st, tuple) or len(st) != 8 or st[0] != 3:
            raise PickleRefused(f"dtype {self.typestr!r}: its state {_short(st)} is not a plain dtype's "
                                f"(structured, sub-array or metadata dtypes are refused)")
        _, order, subarray, names, fields, elsize, alignment, flags = st
        if subarray is not None or names is not None or fields is not None:
            raise PickleRefused(f"dtype {self.typestr!r}: structured and sub-array dtypes are refused")
        if order not in ("<", ">", "|", "="):
            raise PickleRefused(f"dtype {self.typestr!r}: byte order {order!r} is not one of < > | =")
        dt = base.newbyteorder(order) if order in "<>" and base.kind not in "bSO" and base.itemsize > 1 else base
        want = (dt.itemsize, dt.alignment) if dt.kind in "SU" else (-1, -1)
        if (elsize, alignment) != want or flags != dt.flags:
            raise PickleRefused(f"dtype {self.typestr!r}: size {elsize!r}, alignment {alignment!r} and flags "
                                f"{flags!r} are not those of the plain dtype ({want[0]}, {want[1]}, {dt.flags})")
        self._real = dt
        return dt


class _ArrayStub:
    """``_reconstruct(ndarray, ...)`` and its BUILD state ``(version, shape, dtype, fortran, data)``."""

    def __init__(self, budget: "_Budget"):
        self.budget, self.state = budget, None

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise PickleRefused(f"an array's state {_short(state)} is not (version, shape, dtype, order, data)")
        if len(state) == 5:
            if state[0] != 1:
                raise PickleRefused(f"an array's state has version {state[0]!r}, not 1")
            state = state[1:]
        shape, dtype, fortran, data = state
        if not isinstance(dtype, _DtypeStub):
            raise PickleRefused(f"an array's dtype is a {type(dtype).__name__}, not a dtype")
        if not isinstance(fortran, bool):
            raise PickleRefused(f"an array's order flag is {_short(fortran)}, not true or false")
        self.state = (_shape(shape), dtype.real(), fortran, data)
        self.budget.claim(self.state[0], self.state[1])

    def real(self) -> np.ndarray:
        if self.state is None:
            raise PickleRefused("an array without its state (shape, dtype and data)")
        shape, dtype, fortran, data = self.state
        return _array(data, dtype, shape, "F" if fortran else "C", native=True)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _shape(shape) -> tuple[int, ...]:
    if (not isinstance(shape, tuple) or len(shape) > 32
            or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2 ** 62 for n in shape)):
        raise PickleRefused(f"an array's shape {_short(shape)} is not a tuple of at most 32 sizes")
    return shape


class _Budget:
    """The bytes the arrays of one file may declare, all together: no more than the file holds (an
    array's data is in the file; an object array's item takes a byte of it at least). Checked before
    anything is allocated, and summed, so that one buffer reused by reference for many arrays (the
    pickle memo) cannot multiply it."""

    def __init__(self, limit: int):
        self.limit, self.claimed = limit, 0

    def claim(self, shape: tuple, dtype: np.dtype) -> None:
        n = 1
        for d in shape:
            n *= d
        need = n * (1 if dtype.kind == "O" else dtype.itemsize)
        if need > self.limit:
            raise PickleRefused(f"an array declares shape {shape} of {dtype} ({need:,} bytes), "
                                f"more than the whole file holds ({self.limit:,} bytes)")
        self.claimed += need
        if self.claimed > self.limit:
            raise PickleRefused(f"the arrays declare {self.claimed:,} bytes in all, more than the whole file "
                                f"holds ({self.limit:,} bytes)")


def _array(data, dtype: np.dtype, shape: tuple, order: str, native: bool = False) -> np.ndarray:
    """The array ``data`` holds, checked against ``dtype`` and ``shape``. ``native``: in native byte
    order, as numpy's ``__setstate__`` gives it (``_frombuffer``, protocol 5, keeps the file's order)."""
    n = 1
    for d in shape:
        n *= d
    if dtype.kind == "O":
        if not isinstance(data, list) or len(data) != n:
            raise PickleRefused(f"an object array of shape {shape} must hold a list of {n} items")
        bad = next((x for x in data if type(x) not in (str, int)), None)
        if bad is not None:
            raise PickleRefused(f"an object array holds a {type(bad).__name__}; only str and int are accepted")
        out = np.empty(n, dtype=object)
        out[:] = data
        return out.reshape(shape, order=order)
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise PickleRefused(f"an array's data is a {type(data).__name__}, not bytes")
    if len(data) != n * dtype.itemsize:
        raise PickleRefused(f"an array of shape {shape} and dtype {dtype} needs {n * dtype.itemsize:,} bytes, "
                            f"the file holds {len(data):,}")
    out = np.frombuffer(data, dtype=dtype).reshape(shape, order=order)
    if native and not dtype.isnative:
        return out.astype(dtype.newbyteorder("="), order=order)
    return out.copy(order=order)


class _Globals:
    """The stand-ins :class:`QuestionUnpickler` hands out for the allowed globals."""

    def __init__(self, limit: int):
        self.budget = _Budget(limit)

    def reconstruct(self, cls=None, shape=None, code=None, *rest):
        if cls is not _NDARRAY or rest:
            raise PickleRefused("_reconstruct is accepted only for numpy.ndarray")
        return _ArrayStub(self.budget)

    def scalar(self, dtype=None, data=None, *rest):
        if not isinstance(dtype, _DtypeStub) or rest:
            raise PickleRefused("a numpy scalar without a plain dtype")
        dt = dtype.real()
        if dt.kind == "O":
            if type(data) not in (str, int):
                raise PickleRefused(f"an object scalar holds a {type(data).__name__}; only str and int are accepted")
            return data
        self.budget.claim((), dt)
        return _array(data, dt, (), "C")[()]

    def frombuffer(self, buf=None, dtype=None, shape=None, order="C", *rest):
        if not isinstance(dtype, _DtypeStub) or dtype.real().kind == "O" or rest or order not in ("C", "F"):
            raise PickleRefused("_frombuffer is accepted only for a plain dtype in C or F order")
        shape = _shape(shape)
        self.budget.claim(shape, dtype.real())
        return _array(buf, dtype.real(), shape, order)

    @staticmethod
    def empty_bytes(*args):
        if args:
            raise PickleRefused("bytes() is accepted only without arguments (protocol 2's empty bytes)")
        return b""

    @staticmethod
    def encode(text=None, encoding=None, *rest):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or rest:
            raise PickleRefused("_codecs.encode is accepted only for latin-1 (protocol 2's bytes)")
        return codecs.encode(text, "latin1")


class QuestionUnpickler(pickle.Unpickler):
    """Reads one question pickle into plain containers and checked numpy arrays (see the module).
    ``limit``: the most bytes its arrays may declare, all together (the file's size)."""

    def __init__(self, file, limit: int):
        super().__init__(file)
        self._g = _Globals(limit)

    def find_class(self, module: str, name: str):
        canonical = module.replace("numpy.core.", "numpy._core.", 1) if module.startswith("numpy.core.") else module
        if (canonical, name) not in PICKLE_GLOBALS:
            raise PickleRefused(f"refused to unpickle global {module}.{name}: a question file holds only dicts, "
                                f"lists, numbers, strings and numpy arrays, and loading never runs code")
        if name == "ndarray":
            return _NDARRAY
        fn = {"dtype": _DtypeStub, "_reconstruct": self._g.reconstruct, "scalar": self._g.scalar,
              "_frombuffer": self._g.frombuffer, "encode": self._g.encode, "bytes": self._g.empty_bytes}[name]
        return _StandIn(fn, f"{module}.{name}")

    def persistent_load(self, pid):
        raise PickleRefused("persistent ids are refused")


def _realize(obj, seen: dict):
    """``obj`` with every stand-in replaced by the real array / dtype (containers rebuilt)."""
    key = id(obj)
    if key in seen:
        return seen[key]
    if isinstance(obj, _ArrayStub):
        out = obj.real()
    elif isinstance(obj, _DtypeStub):
        out = obj.real()
    elif isinstance(obj, (_Marker, _StandIn)):
        raise PickleRefused(f"{obj._name if isinstance(obj, _StandIn) else 'numpy.ndarray'} itself as a value")
    elif isinstance(obj, dict):
        out = seen[key] = {}
        for k, v in obj.items():
            out[_realize(k, seen)] = _realize(v, seen)
        return out
    elif isinstance(obj, list):
        out = seen[key] = []
        out.extend(_realize(v, seen) for v in obj)
        return out
    elif isinstance(obj, (tuple, set, frozenset)):
        out = type(obj)(_realize(v, seen) for v in obj)
    else:
        out = obj
    seen[key] = out
    return out


def load_question_pickle(path: Path):
    """The object a question pickle holds, with real numpy arrays; :class:`PickleRefused` (or
    another unpickling error) when the file is not a plain one."""
    limit = max(Path(path).stat().st_size, 64)
    with open(path, "rb") as f:
        raw = QuestionUnpickler(f, limit).load()
    try:
        return _realize(raw, {})
    except RecursionError:
        raise PickleRefused("containers nested too deeply") from None
