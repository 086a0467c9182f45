"""What a servlet holds and does, free of HTTP: modules by name, and calls on them.

The ASGI app (:mod:`runmap.server.app`) and the in-process transport
(:mod:`runmap.transport.inprocess`) both drive this class, so the call
semantics are tested once and shared by every transport.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from itertools import starmap
from typing import Any

from runmap import serialization as ser
from runmap.exceptions import ProtocolError, SerializationError

FUNCTION = "function"
CLASS = "class"


class ServletState:
    """Modules placed on one servlet, and the calls made on them."""

    def __init__(self, name: str = "servlet") -> None:
        self.name = name
        self.started = time.time()
        self._modules: dict[str, Any] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------- modules

    def put_module(self, name: str, payload: bytes) -> None:
        """Places a module: a function as it is, or a class instantiated here.

        The payload is ``(kind, obj, args, kwargs)``, cloudpickled by the client.

        Raises:
            ProtocolError: the payload is not a module spec.
            SerializationError: it could not be unpickled here.
            Exception: whatever the class's ``__init__`` raised, to be sent back.
        """
        try:
            spec = ser.loads(payload)
        except Exception as exc:
            raise SerializationError(
                f"module {name!r} could not be unpickled on {self.name}: {exc!r}",
                side="argument",
                replica=self.name,
            ) from exc
        if not (isinstance(spec, tuple) and len(spec) == 4 and spec[0] in (FUNCTION, CLASS)):
            raise ProtocolError(f"not a module spec for {name!r}", 400)
        kind, obj, args, kwargs = spec
        if isinstance(obj, str):
            obj = import_by_path(obj)
        value = obj if kind == FUNCTION else obj(*args, **kwargs)
        with self._lock:
            self._modules[name] = value

    def place_module(self, name: str, payload: bytes) -> bytes:
        """Like :meth:`put_module`, but a user error (a class whose ``__init__``
        raised) comes back inside a serialized outcome, the way a call's does."""
        try:
            self.put_module(name, payload)
        except (ProtocolError, SerializationError):
            raise
        except BaseException as exc:
            return ser.dump_outcome(ser.Outcome([None], {0: ser.ErrorInfo.capture(exc)}))
        return ser.dump_outcome(ser.Outcome([None]))

    def delete_module(self, name: str) -> None:
        with self._lock:
            if self._modules.pop(name, None) is None:
                raise ProtocolError(f"no module {name!r} on {self.name}", 404)

    def module_names(self) -> list[str]:
        with self._lock:
            return sorted(self._modules)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": os.getpid(),
            "modules": self.module_names(),
            "uptime": time.time() - self.started,
        }

    # --------------------------------------------------------------- calls

    def resolve(self, module: str, method: str | None) -> Callable[..., Any]:
        try:
            obj = self._modules[module]
        except KeyError:
            raise ProtocolError(f"no module {module!r} on {self.name}", 404) from None
        if not method or method == "__call__":
            if not callable(obj):
                raise ProtocolError(f"module {module!r} is not callable", 400)
            return obj  # type: ignore[no-any-return]
        if method.startswith("__"):
            # Dunder methods other than __call__ are the object's machinery, not its API.
            raise ProtocolError(f"method {method!r} may not be called remotely", 403)
        fn = getattr(obj, method, None)
        if fn is None or not callable(fn):
            raise ProtocolError(f"module {module!r} has no method {method!r}", 404)
        return fn  # type: ignore[no-any-return]

    def call(self, module: str, method: str | None, payload: bytes | memoryview) -> bytes:
        """Runs a chunk of inputs and returns the serialized outcome.

        Exceptions raised by user code are captured per input; only a request
        that can't be run at all (unknown module, unreadable payload) raises.
        """
        fn = self.resolve(module, method)
        try:
            mode, items, kwargs = ser.load_call(payload)
        except Exception as exc:
            raise SerializationError(
                f"the arguments could not be unpickled on {self.name}: {exc!r}",
                side="argument",
                replica=self.name,
            ) from exc
        return ser.dump_outcome(run_chunk(fn, mode, items, kwargs))


def import_by_path(spec: str) -> Any:
    """The object ``"package.module:name"`` names (``name`` may be dotted), imported here.

    Raises:
        ImportError: naming the module or attribute that is not there; sent back to the client.
    """
    import importlib

    module_name, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(f"cannot import {attr!r} from {module_name!r} ({spec!r})") from None
    return obj


def run_chunk(fn: Callable[..., Any], mode: int, items: list[Any], kwargs: dict[str, Any] | None) -> ser.Outcome:
    """Calls ``fn`` on every item, capturing each input's exception in its slot.

    The items go through ``map`` (or ``starmap``) into ``list.extend``, which
    loops in C: half the cost per item of a Python loop, and on trivial inputs
    that loop is most of a chunk's time. When an input raises, ``extend`` has
    kept the results before it and the iterator is past it: its slot gets the
    error, and the rest of the chunk resumes after it.
    """
    if kwargs:
        fn = functools.partial(fn, **kwargs)
    apply = map if mode == ser.SINGLE else starmap
    results: list[Any] = []
    errors: dict[int, ser.ErrorInfo] = {}
    rest = iter(items)
    while True:
        try:
            results.extend(apply(fn, rest))
        except BaseException as exc:  # SystemExit from user code is that input's error too
            errors[len(results)] = ser.ErrorInfo.capture(exc)
            results.append(None)
            continue
        if len(results) == len(items):
            return ser.Outcome(results, errors)
        # ``map`` took a StopIteration that ``fn`` raised for the end of its inputs: that input failed.
        errors[len(results)] = ser.ErrorInfo.capture(StopIteration(f"{_name(fn)} raised StopIteration"))
        results.append(None)


def _name(fn: Callable[..., Any]) -> str:
    fn = getattr(fn, "func", fn)  # a functools.partial
    return getattr(fn, "__qualname__", None) or type(fn).__name__
