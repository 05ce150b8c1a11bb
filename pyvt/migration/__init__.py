"""Live migration of running VMs (issue 17).

``vm.migrate("tcp:HOST:PORT")`` moves a running VM to a ``pyvt.Vm.incoming``
(or ``pyvt incoming``) on another host while the guest runs on: pre-copy
rounds of dirty pages, then a short stop-and-copy (see :mod:`.source`);
``vm.start_migration`` does it in the background and returns the
:class:`Migration` (``info()``, ``cancel()``, ``wait()``).  The stream is
described in :mod:`.stream`, the machine description in :mod:`.machine`,
the state encoding (snapshot files') in :mod:`.state`, the receiving side
in :mod:`.destination`.  Python handlers' state moves through
``vm.add_state`` hooks (:mod:`pyvt.state_hooks`).
"""

from .destination import Listener
from .source import Migration, MigrationResult
from .stream import FORMAT_VERSION, parse_uri
from ..errors import MigrationError

__all__ = ["Migration", "MigrationResult", "Listener", "MigrationError", "FORMAT_VERSION",
           "parse_uri", "incoming"]


def incoming(uri, setup=None, backend=None, vm_class=None, timeout=None):
    """Implements :meth:`pyvt.Vm.incoming`: ``uri`` a URI to listen on, or a
    :class:`Listener` already listening."""
    listener = uri if isinstance(uri, Listener) else Listener(uri)
    return listener.accept(setup=setup, backend=backend, vm_class=vm_class, timeout=timeout)
