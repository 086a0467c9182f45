"""How arguments, results and errors travel between the client and a servlet.

A *call* carries a chunk of inputs for one module method; the *outcome* carries
their results and, for the inputs whose user code raised, the exceptions with
their formatted tracebacks. Both are single pickles: a chunk of a thousand ints
costs one ``dumps`` and one ``loads``, not a thousand.

Plain :mod:`pickle` is tried first because it is several times faster than
cloudpickle on small objects; cloudpickle takes over for what pickle cannot
handle (lambdas, closures, classes and functions defined in ``__main__`` or a
notebook, which must travel by value). When neither can pickle a chunk, each
item is tried alone so that the error names the one that failed.

Large bytes inputs and results (``OUT_OF_BAND_MIN`` and up, at the top level
of a chunk) travel as pickle protocol 5 out-of-band buffers: the pickle holds
only their place, and the wire frame is the pickle followed by the buffers::

    b"RMOB" | count (4 bytes) | pickle length, buffer lengths (8 bytes each) | pickle | buffers

Building that frame copies each buffer once; an in-band pickle of a 10 MB
bytes object copies it two or three times as its output grows, and the
``__main__`` check below would scan it all.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import threading
import traceback

from runmap._typing import TYPE_CHECKING
from runmap.exceptions import RemoteError, RemoteTraceback, SerializationError

if TYPE_CHECKING:
    from typing import Any

PROTOCOL = 5

# Single-argument calls (by far the most common: ``map(f, xs)``) send the bare
# values instead of 1-tuples, which saves two opcodes per item on the wire.
SINGLE = 1
STAR = 2

OUT_OF_BAND_MIN = 256 << 10
FRAME_MAGIC = b"RMOB"  # can't start a pickle: protocol 2+ pickles start with b"\x80"
_COUNT = struct.Struct("<I")
_LENGTH = struct.Struct("<Q")
_BYTES_LIKE = (bytes, bytearray)


def _cloudpickle() -> Any:
    """cloudpickle, imported when first needed: a servlet whose modules and results plain pickle
    handles never imports it (with what it imports: dataclasses, inspect, typing, logging,
    platform), which is about a fifth of a servlet's start-up."""
    import cloudpickle

    return cloudpickle


def dumps(obj: Any) -> bytes:
    """Pickles ``obj``, with cloudpickle where plain pickle can't or shouldn't.

    Plain pickle stores functions and classes by reference; one defined in
    ``__main__`` would then be looked up in the *servlet's* ``__main__`` and
    fail there, so such a pickle is redone by value.
    """
    try:
        data = pickle.dumps(obj, protocol=PROTOCOL)
    except Exception:
        return _cloudpickle().dumps(obj, protocol=PROTOCOL)
    if b"__main__" in data:
        return _cloudpickle().dumps(obj, protocol=PROTOCOL)
    return data


def loads(data: bytes | bytearray | memoryview) -> Any:
    if data[:4] == FRAME_MAGIC if isinstance(data, memoryview) else data.startswith(FRAME_MAGIC):
        return _loads_frame(memoryview(data))
    return pickle.loads(data)


class _OutOfBand:
    """Stands for a large bytes-like object in a pickle; its buffer goes out of band."""

    __slots__ = ("obj",)

    def __init__(self, obj: bytes | bytearray) -> None:
        self.obj = obj

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        # Rebuilt as its own type; bytes(buffer) is the one copy on the receiving side.
        return (type(self.obj), (pickle.PickleBuffer(self.obj),))


def _has_large_buffers(items: list[Any]) -> bool:
    # Looks at the first item only, so a chunk of a million ints pays nothing;
    # a chunk whose first item is small goes in band, which is correct, only slower.
    first = items[0] if items else None
    if isinstance(first, tuple) and first:
        first = first[0]
    return isinstance(first, _BYTES_LIKE) and len(first) >= OUT_OF_BAND_MIN


def _wrap(value: Any) -> Any:
    if isinstance(value, _BYTES_LIKE) and len(value) >= OUT_OF_BAND_MIN:
        return _OutOfBand(value)
    if type(value) is tuple and any(isinstance(v, _BYTES_LIKE) for v in value):
        return tuple(_wrap(v) for v in value)
    return value


def dumps_out_of_band(obj: Any) -> bytes:
    """Like :func:`dumps`, with :class:`_OutOfBand` values' buffers in a frame after the pickle."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
        if b"__main__" in data:
            raise pickle.PicklingError("by value")
    except Exception:
        buffers.clear()
        data = _cloudpickle().dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
    if not buffers:
        return data
    views = [b.raw() for b in buffers]
    head = FRAME_MAGIC + _COUNT.pack(len(views)) + b"".join(_LENGTH.pack(n) for n in [len(data), *map(len, views)])
    return b"".join([head, data, *views])


def _loads_frame(view: memoryview) -> Any:
    (count,) = _COUNT.unpack_from(view, 4)
    pos = 8
    lengths = [_LENGTH.unpack_from(view, pos + 8 * i)[0] for i in range(count + 1)]
    pos += 8 * (count + 1)
    parts = []
    for n in lengths:
        parts.append(view[pos : pos + n])
        pos += n
    if pos != len(view):
        raise pickle.UnpicklingError(f"a frame of {len(view)} bytes declares {pos}")
    return pickle.loads(parts[0], buffers=parts[1:])


def first_unpicklable(items: list[Any]) -> tuple[int, BaseException] | None:
    """Index and error of the first item that neither pickle can serialize."""
    for i, item in enumerate(items):
        try:
            dumps(item)
        except Exception as exc:
            return i, exc
    return None


# --------------------------------------------------------------------- calls


def dump_call(mode: int, items: list[Any], kwargs: dict[str, Any] | None, base_index: int = 0) -> bytes:
    """Serializes a chunk of inputs, naming the first input that can't be.

    Raises:
        SerializationError: with ``side="argument"`` and the input's index.
    """
    try:
        if _has_large_buffers(items):
            return dumps_out_of_band((mode, [_wrap(x) for x in items], kwargs or None))
        return dumps((mode, items, kwargs or None))
    except Exception as exc:
        bad = first_unpicklable(items)
        if bad is None:
            raise SerializationError(
                f"the keyword arguments could not be pickled: {exc!r}", side="argument"
            ) from exc
        i, item_exc = bad
        raise SerializationError(
            f"input {base_index + i} could not be pickled (argument): {item_exc!r}",
            index=base_index + i,
            side="argument",
        ) from item_exc


def load_call(data: bytes | bytearray | memoryview) -> tuple[int, list[Any], dict[str, Any] | None]:
    mode, items, kwargs = loads(data)
    return mode, items, kwargs


# ------------------------------------------------------------------ outcomes


class ErrorInfo:
    """An exception raised by user code in a replica, ready to travel.

    ``exc`` is the pickled exception, or None when it could not be pickled;
    ``type_name``, ``message`` and ``tb`` always survive.
    """

    __slots__ = ("exc", "message", "tb", "type_name")

    def __init__(self, exc: bytes | None, type_name: str, message: str, tb: str) -> None:
        self.exc = exc
        self.type_name = type_name
        self.message = message
        self.tb = tb

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ErrorInfo) and _fields(self) == _fields(other)

    def __repr__(self) -> str:
        return f"ErrorInfo(type_name={self.type_name!r}, message={self.message!r})"

    @classmethod
    def capture(cls, exc: BaseException) -> ErrorInfo:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            blob: bytes | None = dumps(exc)
            loads(blob or b"")  # an exception that pickles but can't be rebuilt is no better
        except Exception:
            blob = None
        type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        return cls(blob, type_name, str(exc), tb)

    def to_exception(self, index: int | None = None, replica: str | None = None) -> BaseException:
        """Rebuilds the user's exception with the remote traceback as its cause.

        With ``replica`` (and ``index``, the input's position in its map), the
        exception also says where it was raised; see :func:`annotate`.
        """
        exc: BaseException | None = None
        if self.exc is not None:
            try:
                exc = loads(self.exc)
            except Exception:
                exc = None
        if exc is None:
            exc = RemoteError(f"{self.type_name}: {self.message}", self.type_name, self.tb)
        exc.__cause__ = RemoteTraceback(self.tb)
        if replica is not None:
            annotate(exc, index, replica)
        return exc


def annotate(exc: BaseException, index: int | None, replica: str) -> None:
    """Says on a user's exception which input and replica raised it, without changing its type.

    It gets the attributes ``runmap_index`` (the input's position in its map,
    None for a single call) and ``runmap_replica``, and, on Python 3.11+, a
    PEP 678 note that tracebacks print below the message:
    ``runmap: raised by input 3 on replica check_replica_1``.
    """
    try:
        exc.runmap_index = index  # type: ignore[attr-defined]
        exc.runmap_replica = replica  # type: ignore[attr-defined]
    except Exception:  # a __setattr__ of its own that refuses: the note still says it
        pass
    add_note = getattr(exc, "add_note", None)  # Python 3.11+
    if add_note is not None:
        add_note(f"runmap: raised by input {index} on replica {replica}" if index is not None
                 else f"runmap: raised on replica {replica}")  # fmt: skip


class Outcome:
    """Results of one chunk: ``results[i]`` unless ``i in errors``."""

    __slots__ = ("errors", "results")

    def __init__(self, results: list[Any], errors: dict[int, ErrorInfo] | None = None) -> None:
        self.results = results
        self.errors: dict[int, ErrorInfo] = {} if errors is None else errors

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Outcome) and _fields(self) == _fields(other)

    def __repr__(self) -> str:
        return f"Outcome(results={self.results!r}, errors={self.errors!r})"


def _fields(obj: Any) -> tuple[Any, ...]:
    return tuple(getattr(obj, name) for name in obj.__slots__)


def dump_outcome(outcome: Outcome) -> bytes:
    """Serializes an outcome; a result that can't be pickled becomes that input's error."""
    while True:
        try:
            results = outcome.results
            if _has_large_buffers(results):
                results = [_wrap(x) for x in results]
                return dumps_out_of_band((results, _errors_to_wire(outcome.errors)))
            return dumps((results, _errors_to_wire(outcome.errors)))
        except Exception as exc:
            bad = first_unpicklable(outcome.results)
            if bad is None:
                raise SerializationError(f"an outcome could not be pickled: {exc!r}", side="result") from exc
            i, item_exc = bad
            err = SerializationError(
                f"the result of input #{i} of its chunk could not be pickled (result): {item_exc!r}",
                index=i,
                side="result",
            )
            outcome.results[i] = None
            outcome.errors[i] = ErrorInfo.capture(err)


def _errors_to_wire(errors: dict[int, ErrorInfo]) -> dict[int, tuple[bytes | None, str, str, str]] | None:
    if not errors:
        return None
    return {i: (e.exc, e.type_name, e.message, e.tb) for i, e in errors.items()}


def load_outcome(data: bytes | bytearray | memoryview) -> Outcome:
    results, errors = loads(data)
    if not errors:
        return Outcome(results, {})
    return Outcome(results, {i: ErrorInfo(*e) for i, e in errors.items()})


# ------------------------------------------------------------------- modules


def dump_module(obj: Any, by_value: bool = False) -> bytes:
    """Serializes a function or class with its code when it isn't importable remotely.

    With ``by_value`` (a cluster on other machines, which have runmap and the
    env's packages but not the client's own files), functions and classes of the
    client's own modules (not installed packages) travel by value too.
    """
    buf = io.BytesIO()
    shipped = _own_modules(obj) if by_value else []
    for module in shipped:
        _cloudpickle().register_pickle_by_value(module)
    try:
        _cloudpickle().CloudPickler(buf, protocol=PROTOCOL).dump(obj)
    except Exception as exc:
        what = getattr(obj[1], "__qualname__", repr(obj[1])) if isinstance(obj, tuple) and len(obj) > 1 else repr(obj)
        raise SerializationError(
            f"{what} could not be pickled to ship it to a replica (argument): {exc!r}. "
            "A function or class travels with what it refers to: locks, sockets and open files can't.",
            side="argument",
        ) from exc
    finally:
        for module in shipped:
            _cloudpickle().unregister_pickle_by_value(module)
    return buf.getvalue()


_paths_lock = threading.Lock()
_installed: tuple[str, ...] = ()


def _installed_paths() -> tuple[str, ...]:
    """Where the standard library and installed packages live (``sysconfig``'s first use isn't thread-safe)."""
    global _installed
    with _paths_lock:
        if not _installed:
            import sysconfig

            paths = sysconfig.get_paths()
            _installed = tuple({paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})
        return _installed


def _own_modules(obj: Any) -> list[Any]:
    """The client's own modules (not the standard library, not installed packages) that ``obj`` comes from."""
    import sys

    installed = _installed_paths()
    parts = obj if isinstance(obj, tuple) else (obj,)
    found = []
    for part in parts:
        name = getattr(part, "__module__", None)
        module = sys.modules.get(name or "")
        path = getattr(module, "__file__", None)
        if module is None or path is None or not name or name == "__main__" or name.split(".")[0] == "runmap":
            continue
        if not any(os.path.abspath(path).startswith(os.path.abspath(p) + os.sep) for p in installed):
            found.append(module)
    return found
