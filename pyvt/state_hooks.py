"""State kept in Python, saved and loaded with the VM's: ``vm.add_state``.

A Python handler (``vm.on_io``/``on_mmio``/``on_msr``) often holds device
state in Python objects: registers, a counter, a FIFO.  KVM and the native
devices know nothing of it, so a snapshot or a live migration would leave it
behind.  ``vm.add_state(name, save=..., load=...)`` registers a pair of
callables: ``save()`` returns the state, ``load(state)`` puts it back.  The
state is what a native device's ``save_state()`` may return: dicts with str
keys, lists, tuples (loaded back as lists), ints, bools, strs, bytes and
None (:func:`pyvt.snapshot_file._encode_state` checks it).

``vm.snapshot()`` calls every ``save`` (``Snapshot.hooks``: ``{name:
state}``) and ``vm.restore(snap)`` every ``load``; ``Vm.from_snapshot``
clones get the hooks' state only if their hooks are registered before
restoring (hooks belong to a VM object, not to a snapshot).  Snapshot files
do not carry hook state.  A live migration carries it in its ``HOOKS``
chunk; the destination's ``setup(vm)`` must register hooks of the same names,
whose ``load`` the destination calls before the VM runs.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

from .errors import ArgumentError, ArgumentTypeError, Error, SnapshotError

Hooks = Dict[str, Tuple[Callable[[], Any], Callable[[Any], None]]]


def hooks(vm) -> Hooks:
    """``vm``'s hooks, {name: (save, load)}, made on first use."""
    found = vm.__dict__.get("_state_hooks")
    if found is None:
        found = vm.__dict__["_state_hooks"] = {}
    return found


def add(vm, name: str, save: Callable[[], Any], load: Callable[[Any], None]) -> None:
    """Implements :meth:`pyvt.Vm.add_state`."""
    if not isinstance(name, str) or not name:
        raise ArgumentTypeError(f"a state hook's name is a non-empty str, not {name!r}")
    if not callable(save) or not callable(load):
        raise ArgumentTypeError("add_state needs callables: save() -> state, load(state)")
    table = hooks(vm)
    if name in table:
        raise ArgumentError(f"a state hook named {name!r} exists already: "
                            f"vm.remove_state({name!r}) first")
    table[name] = (save, load)


def remove(vm, name: str) -> None:
    """Implements :meth:`pyvt.Vm.remove_state`."""
    if hooks(vm).pop(name, None) is None:
        raise ArgumentError(f"no state hook named {name!r}")


def save_all(vm) -> Dict[str, Any]:
    """Every hook's state, checked to be encodable as a device state is."""
    from .snapshot_file import _encode_state

    states = {}
    for name, (save, _) in hooks(vm).items():
        try:
            state = save()
        except Exception as e:
            raise SnapshotError(f"the {name!r} state hook's save() failed: "
                                f"{type(e).__name__}: {e}") from e
        _encode_state(state, lambda data: 0)  # raises SnapshotError if it cannot be kept
        states[name] = state
    return states


def load_all(vm, states: Dict[str, Any]) -> None:
    """Gives each hook its state; a state without a hook is refused first."""
    if not states:
        return  # nothing to give (a VM without hooks, in a restore loop)
    table = hooks(vm)
    missing = sorted(set(states) - set(table))
    if missing:
        raise SnapshotError(f"there is state for the hook(s) {', '.join(missing)} but this VM "
                            "has no such hook: register it with vm.add_state() first")
    for name, state in states.items():
        try:
            table[name][1](state)
        except Error:
            raise
        except Exception as e:
            raise SnapshotError(f"the {name!r} state hook's load() failed: "
                                f"{type(e).__name__}: {e}") from e
