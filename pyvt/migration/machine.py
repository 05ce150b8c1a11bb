"""What a migrating VM is made of, apart from its state: the ``SETUP``
chunk.  The source describes its machine (:func:`describe`) after checking
it can move at all (:func:`check_movable`); the destination builds the same
machine (:func:`build`) and, once the caller's ``setup(vm)`` has registered
its Python handlers and state hooks, checks they match (:func:`check_matches`)."""

from __future__ import annotations

import json
from typing import Any, Dict, List

from .. import _native, modes
from ..errors import MigrationError

_SPACES = {_native.SPACE_PIO: "port", _native.SPACE_MMIO: "MMIO", _native.SPACE_MSR: "MSR"}


def handler_ranges(vm) -> List[List[Any]]:
    """[space, start, length] of every Python handler, sorted."""
    return sorted([space, start, length] for (space, start), (length, owner)
                  in vm._claims.items() if owner.startswith("handler"))


def check_movable(vm) -> None:
    """Refuses, before anything is sent, a VM with parts that cannot move."""
    vm._check_open()
    if not vm.vcpus:
        raise MigrationError("this VM has no vCPU: there is nothing running to migrate")
    for region in vm.memory.regions:
        if region.source is not None:
            raise MigrationError(
                f"{region!r} maps host memory (vm.memory.map) that the host may write "
                "unseen: it cannot be migrated; remove it (vm.memory.remove_region) first")
    vm.memory.track_dirty_pages()
    blind = [region for region in vm.memory.regions if not region.tracked]
    if blind:
        raise MigrationError(f"{vm.backend} keeps no dirty log for {blind[0]!r}: live "
                             "migration needs one (use /dev/kvm)")
    if getattr(vm, "_pci", None) is not None:
        raise MigrationError("this VM has a PCI bus (vm.pci): its devices' configuration "
                             "and state (BARs, MSI-X, virtio queues) do not move yet")
    if getattr(vm, "_gsi_routes", ()):
        raise MigrationError("this VM has a GSI routing table (vm.gsi_routing): migration "
                             "does not carry it yet")


def describe(vm) -> Dict[str, Any]:
    console = vm.console
    return {
        "regions": [[r.gpa, r.size, r.readonly] for r in vm.memory.regions],
        "vcpus": [[cpu.index, cpu.mode, cpu.ring] for cpu in
                  sorted(vm.vcpus.values(), key=lambda cpu: cpu.index)],
        "irqchip": bool(vm.fd.has_irqchip),
        "pit": bool(vm.fd.has_pit),
        "booted_irqchip": getattr(vm, "_irqchip", None),
        "pc_devices": vm.fw_cfg is not None,
        "debug_exit_port": vm.debug_exit.port if vm.debug_exit is not None else None,
        "output_limit": console.limit if console is not None else None,
        "dirty_ring": vm.dirty_ring,
        "unclaimed_as_pc": bool(vm._machine.unclaimed_as_pc),
        "handlers": handler_ranges(vm),
        "hooks": sorted(getattr(vm, "_state_hooks", {}) or {}),
        "backend": vm.backend,
    }


def _fail(what: str):
    raise MigrationError(f"the source's SETUP is malformed: {what}")


def parse(payload: bytes) -> Dict[str, Any]:
    """The SETUP chunk, checked field by field before anything is built."""
    try:
        setup = json.loads(payload)
    except (ValueError, RecursionError) as e:
        _fail(f"not JSON ({e})")
    keys = {"regions", "vcpus", "irqchip", "pit", "booted_irqchip", "pc_devices",
            "debug_exit_port", "output_limit", "dirty_ring", "unclaimed_as_pc", "handlers",
            "hooks", "backend"}
    if not isinstance(setup, dict) or set(setup) != keys:
        _fail("its fields are not the ones this pyvt knows")

    def integer(value, low=0, high=1 << 64):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
            _fail(f"{value!r} is not an integer in range")
        return value

    regions = setup["regions"]
    if not isinstance(regions, list) or not regions:
        _fail("no memory regions")
    for region in regions:
        if not (isinstance(region, list) and len(region) == 3 and isinstance(region[2], bool)):
            _fail(f"bad region {region!r}")
        integer(region[0], 0, 1 << 52)
        integer(region[1], 4096, 1 << 52)
        if region[0] % 4096 or region[1] % 4096:
            _fail(f"region {region!r} is not page-aligned")
    if regions[0][0] != 0 or regions[0][2]:
        _fail("the first region is not writable RAM at 0")
    vcpus = setup["vcpus"]
    if not isinstance(vcpus, list) or not vcpus:
        _fail("no vCPUs")
    for vcpu in vcpus:
        if not (isinstance(vcpu, list) and len(vcpu) == 3 and vcpu[1] in modes.MODES
                and vcpu[2] in modes.RINGS):
            _fail(f"bad vCPU {vcpu!r}")
        integer(vcpu[0], 0, 1 << 32)
    for handler in setup["handlers"] if isinstance(setup["handlers"], list) else _fail("handlers"):
        if not (isinstance(handler, list) and len(handler) == 3 and handler[0] in _SPACES):
            _fail(f"bad handler range {handler!r}")
        integer(handler[1]), integer(handler[2], 1)
    if not (isinstance(setup["hooks"], list) and all(isinstance(h, str) for h in setup["hooks"])):
        _fail("bad hook names")
    for flag in ("irqchip", "pit", "pc_devices", "unclaimed_as_pc"):
        if not isinstance(setup[flag], bool):
            _fail(f"{flag} is not true or false")
    if setup["debug_exit_port"] is not None:
        integer(setup["debug_exit_port"], 0, 0x10000 - _native.DEBUG_EXIT_PORT_COUNT + 1)
    if setup["output_limit"] is not None:
        integer(setup["output_limit"], 0)
    integer(setup["dirty_ring"])
    return setup


def build(setup: Dict[str, Any], vm_class, backend=None):
    """A VM of the machine ``setup`` describes, with no state yet: memory
    regions (zeroed), irqchip and PIT, vCPUs (their CPUID comes with the
    state), native devices."""
    regions = setup["regions"]
    vm = vm_class(memory=regions[0][1], backend=backend,
                  debug_exit_port=setup["debug_exit_port"], pc_devices=setup["pc_devices"],
                  output_limit=setup["output_limit"],
                  dirty_ring=setup["dirty_ring"] or False)
    try:
        for gpa, size, readonly in regions[1:]:
            vm.memory.add_region(gpa, size, readonly)
        if setup["irqchip"]:
            vm.fd.create_irqchip()
        if setup["pit"]:
            vm.fd.create_pit2()
        if setup["booted_irqchip"] is not None:
            vm._irqchip = setup["booted_irqchip"]
        vm._machine.unclaimed_as_pc = setup["unclaimed_as_pc"]
        for index, mode, ring in setup["vcpus"]:
            vm._new_vcpu(index, mode, setup=False, ring=ring)
    except BaseException:
        vm.close()
        raise
    return vm


def check_matches(vm, setup: Dict[str, Any]) -> None:
    """After the destination's setup(vm): the same Python handlers and hooks."""
    mine = handler_ranges(vm)
    if mine != setup["handlers"]:
        def show(ranges):
            return ", ".join(f"{_SPACES[s]} {start:#x}+{n}" for s, start, n in ranges) or "none"

        raise MigrationError(
            f"the source VM has Python handlers at {show(setup['handlers'])}, this one at "
            f"{show(mine)}: register the same handlers in Vm.incoming(setup=...)")
    hooks = sorted(getattr(vm, "_state_hooks", {}) or {})
    if hooks != setup["hooks"]:
        raise MigrationError(
            f"the source VM has the state hooks {setup['hooks']}, this one {hooks}: register "
            "the same ones (vm.add_state) in Vm.incoming(setup=...)")
