"""The one libvirt boundary of the host daemon: connections, worker thread, errors.

Everything that talks to libvirt goes through a :class:`Host` (the VM
lister, the built-in sources, the accounting's shaper):

- the read-only connection: listing, domain XML, statistics. It also works
  after -u USER against a polkit-protected libvirtd. Liveness is checked with
  isAlive() before each use, a failed call drops it, and it is re-opened on
  the next use; an outage is logged once when it starts and once when it
  ends (upstream logs four lines per cycle, and exits when a call fails);
- the read-write connection, opened only when something must change a
  domain (the accounting's bandwidth caps), lazily, on first use;
- libvirt's default error handler, which prints "libvirt: ... error : ..."
  on stderr, silenced once per process: we log instead;
- the one worker thread that runs the blocking libvirt-python calls for the
  event loop (:class:`BlockingWorker`);
- ``libvirt.libvirtError`` translated into :class:`vhostmd_py.errors.LibvirtError`
  (:meth:`Host.error`): no libvirt exception type leaves this module's users.

``libvirt`` is imported lazily, so that guests, which install without
libvirt-python, can import the package. A host installed without the
``[host]`` extra has no libvirt-python either: that is said once, in one
line with the way to install it, and the daemon publishes host metrics only.
The URI is a parameter (None: libvirt's default URI).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from typing import Any, Callable, TypeVar

from vhostmd_py.errors import LibvirtError

log = logging.getLogger(__name__)

T = TypeVar("T")

MISSING_LIBVIRT = (
    "libvirt-python is not installed (%s): VM metrics and the virtio transport are off, "
    "publishing host metrics only; install it with pip install 'vhostmd-py[host]' "
    "or your distribution's python3-libvirt"
)

_handler_lock = threading.Lock()
_handler_installed = False


def silence_default_handler(libvirt: Any) -> None:
    """Stop libvirt printing "libvirt: ... error : ..." on stderr; we log instead."""
    global _handler_installed
    with _handler_lock:
        if not _handler_installed:
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            _handler_installed = True


def import_libvirt() -> Any:
    """The libvirt module, its default error handler silenced (ImportError when missing)."""
    import libvirt

    silence_default_handler(libvirt)
    return libvirt


def is_libvirt_error(err: BaseException) -> bool:
    """Whether ERR is libvirt-python's libvirtError (without importing libvirt)."""
    return type(err).__name__ == "libvirtError" and type(err).__module__ == "libvirt"


def translate(err: BaseException, uri: str | None) -> LibvirtError:
    """libvirt's error as the product's: the URI, libvirt's message and error code."""
    get_code = getattr(err, "get_error_code", None)
    code = get_code() if callable(get_code) else None
    return LibvirtError(uri, str(err), code=code)


class BlockingWorker:
    """One daemon thread running blocking calls (libvirt) for the event loop.

    Not a ThreadPoolExecutor: its threads are joined at interpreter exit, so a
    libvirt call stuck on a dead remote libvirtd would delay our exit past the
    2-second stop promise. A daemon thread is simply abandoned.
    """

    def __init__(self, name: str = "vhostmd-libvirt") -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._started = False

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in the worker thread and await its result."""
        if not self._started:
            self._thread.start()
            self._started = True
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, args, loop, future))
        return await future

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args, loop, future = item
            try:
                result, error = fn(*args), None
            except BaseException as err:
                result, error = None, err
            # RuntimeError: the loop is closed, nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, future, result, error)

    def shutdown(self) -> None:
        """Let the thread end after the calls already queued."""
        self._queue.put(None)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


_events_lock = threading.Lock()
_events_started = False


def start_events(libvirt: Any) -> bool:
    """libvirt's default event loop on a daemon thread, once per process (False: unavailable).

    Connections opened after it deliver domain events (the policy's
    metadata-change event); the daemon starts it only when a config asks.
    """
    global _events_started
    with _events_lock:
        if _events_started:
            return True
        try:
            libvirt.virEventRegisterDefaultImpl()
        except libvirt.libvirtError as err:
            log.warning("libvirt events unavailable: %s", err)
            return False

        def run() -> None:
            while True:
                if libvirt.virEventRunDefaultImpl() < 0:
                    time.sleep(0.1)  # an error in the loop itself: do not spin

        threading.Thread(target=run, name="vhostmd-libvirt-events", daemon=True).start()
        _events_started = True
        return True


def events_running() -> bool:
    """Whether libvirt's event loop runs in this process."""
    return _events_started


class Host:
    """One libvirt URI's connections and worker thread (nova's ``Host`` is the model).

    Every method but :meth:`call` is blocking (libvirt-python is): run them
    on :attr:`worker`, as the daemon does.
    """

    def __init__(self, uri: str | None, *, worker: BlockingWorker | None = None,
                 read_only: Any = None) -> None:
        """READ_ONLY: an open read-only connection to use (tests share a test-driver
        instance this way: each open of test:///default is its own)."""
        self.uri = uri
        self.worker = worker if worker is not None else BlockingWorker()
        self._libvirt: Any = None
        # Set when `import libvirt` failed: said once, never retried (a package
        # installed into a running interpreter's path needs a restart anyway).
        self._missing: str | None = None
        self._ro: Any = read_only
        self._ro_events = read_only is not None  # whether it was opened with events running
        self._rw: Any = None
        self._down = False

    # --- the module ----------------------------------------------------------------

    def module(self) -> Any:
        """The libvirt module, or None when libvirt-python is missing (logged once)."""
        if self._libvirt is None and self._missing is None:
            try:
                self._libvirt = import_libvirt()
            except ImportError as err:
                self._missing = str(err)
                log.warning(MISSING_LIBVIRT, err)
                return None
        return self._libvirt

    @property
    def available(self) -> bool:
        """Whether libvirt-python can be imported (logs the one line when it cannot)."""
        return self.module() is not None

    def describe(self) -> str:
        """The URI for log lines."""
        return self.uri if self.uri is not None else "(default URI)"

    def error(self, err: BaseException) -> LibvirtError:
        """libvirt's ERR as the product's LibvirtError."""
        return translate(err, self.uri)

    def is_error(self, err: BaseException, code: str | None = None) -> bool:
        """Whether ERR is a libvirt error (with error code CODE, e.g. "VIR_ERR_NO_DOMAIN")."""
        if isinstance(err, LibvirtError):
            found = err.code
        elif is_libvirt_error(err):
            found = err.get_error_code()  # type: ignore[attr-defined]
        else:
            return False
        if code is None:
            return True
        libvirt = self.module()
        return libvirt is not None and found == getattr(libvirt, code, object())

    # --- the read-only connection ---------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the read-only connection is open now."""
        return self._ro is not None

    def read_only(self) -> Any:
        """The read-only connection (re-opened after a loss), or None (logged once)."""
        libvirt = self.module()
        if libvirt is None:
            return None
        if self._ro is not None:
            try:
                if self._ro.isAlive():
                    return self._ro
            except libvirt.libvirtError:
                pass
            self.drop_read_only()
        try:
            self._ro = libvirt.openReadOnly(self.uri)
            self._ro_events = events_running()
        except libvirt.libvirtError as err:
            self.outage(self.error(err))
            return None
        if self._down:
            log.info("libvirt connection to %s restored", self.describe())
            self._down = False
        return self._ro

    def outage(self, err: LibvirtError) -> None:
        """Log ERR once when an outage starts (then at debug level until it ends)."""
        if not self._down:
            log.error("Unable to open libvirt connection to %s: %s", self.describe(), err.reason)
            self._down = True
        else:
            log.debug("libvirt still unreachable at %s: %s", self.describe(), err.reason)

    def enable_events(self) -> bool:
        """Start libvirt's event loop; a connection opened before it is re-opened (blocking)."""
        libvirt = self.module()
        if libvirt is None or not start_events(libvirt):
            return False
        if self._ro is not None and not self._ro_events:
            self.drop_read_only()
        return True

    def drop_read_only(self) -> None:
        """Close the read-only connection (after a failed call; re-opened on next use)."""
        conn, self._ro = self._ro, None
        _close(conn)

    # --- the read-write connection --------------------------------------------------

    def read_write(self) -> Any:
        """The read-write connection, opened on first use (LibvirtError when impossible)."""
        libvirt = self.module()
        if libvirt is None:
            raise LibvirtError(self.uri, f"libvirt-python is not installed ({self._missing})")
        try:
            if self._rw is None or not self._rw.isAlive():
                self._rw = libvirt.open(self.uri)
        except libvirt.libvirtError as err:
            self._rw = None
            raise self.error(err) from err
        return self._rw

    def drop_read_write(self) -> None:
        """Close the read-write connection (re-opened on next use)."""
        conn, self._rw = self._rw, None
        _close(conn)

    # --- the worker and the end ---------------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the worker thread; a libvirtError comes back as LibvirtError."""
        try:
            return await self.worker.call(fn, *args)
        except Exception as err:
            if is_libvirt_error(err):
                raise self.error(err) from err
            raise

    def close(self) -> None:
        """Close both connections (idempotent; blocking)."""
        self.drop_read_only()
        self.drop_read_write()


def _close(conn: Any) -> None:
    if conn is not None:
        try:
            conn.close()
        except Exception as err:  # closing a dead connection may fail; nothing to do
            log.debug("closing libvirt connection: %s", err)
