# SPDX-License-Identifier: GPL-2.0
# shellcheck shell=sh
#
# Sourced by the test VMs' /init (vm-init under QEMU, bochs-init under
# Bochs), from /lib/init-lib.sh in the initramfs: the checks both run the
# same way.  Busybox sh.  Results are printed as
# "PYVT-RESULT <name> PASS|FAIL <detail>"; finish prints PYVT-DONE.
export PATH=/bin

init_system() {
	mount -t proc proc /proc
	mount -t sysfs sys /sys
	mount -t devtmpfs dev /dev
	mount -t tmpfs tmp /tmp
	# pyvt_<name>=<value> on the kernel command line become variables.
	for arg in $(cat /proc/cmdline); do
		case $arg in
		pyvt_*=*) eval "${arg%%=*}=${arg#*=}" ;;
		esac
	done
}

result() {
	echo "PYVT-RESULT $1 $2 $3"
}

bad_dmesg() {
	dmesg | grep -E 'BUG:|WARNING:|Oops|general protection|Call Trace|RIP:|leaked|soft lockup|detected stall|refcount_t|list_(add|del) corruption'
}

finish() {
	echo PYVT-DONE
	sync
	# poweroff -f does not wait for the serial port to send what the
	# tty still holds (under Bochs the last lines were lost).
	sleep 2
	poweroff -f
}

# load: insmod pyvt.ko, with the module's own line from dmesg.
load_pyvt() {
	if insmod /bin/pyvt.ko; then
		result load PASS "$(dmesg | grep -m1 'pyvt: /dev/pyvt' | sed 's/.*pyvt: //')"
	else
		result load FAIL "insmod failed: $(dmesg | grep pyvt | tail -1)"
		dmesg | tail -20
		return 1
	fi
}

# run_smoke DEV OUT: kvm_smoke on DEV, shown as it runs (so a hang shows
# where it stopped) and kept in OUT; returns its exit status.
run_smoke() {
	{
		timeout 300 kvm_smoke "$1" 2>&1
		echo $? >"$2.rc"
	} | tee "$2"
	return "$(cat "$2.rc")"
}

# smoke-pyvt: the plain KVM API program against /dev/pyvt.
smoke_pyvt() {
	run_smoke /dev/pyvt /tmp/smoke-pyvt.txt
	rc=$?
	[ $rc = 0 ] && result smoke-pyvt PASS "" || result smoke-pyvt FAIL "exit $rc"
}

# smoke-kvm: the same program against the reference KVM (already
# loaded as /dev/kvm); it must pass and print KVM's transcript, which
# keeps kvm_smoke.expected honest.
smoke_kvm() {
	run_smoke /dev/kvm /tmp/smoke-kvm.txt
	rc=$?
	if [ $rc != 0 ]; then
		result smoke-kvm FAIL "exit $rc"
	elif ! same_transcript /lib/kvm_smoke.expected /tmp/smoke-kvm.txt; then
		result smoke-kvm FAIL "KVM's output differs from kvm_smoke.expected (diff above)"
	else
		result smoke-kvm PASS "KVM printed kvm_smoke.expected"
	fi
}

# same_transcript A B: the two outputs diffed without the '#' lines,
# which describe the backend; prints the diff if they differ.
same_transcript() {
	grep -v '^#' "$1" >/tmp/a
	grep -v '^#' "$2" >/tmp/b
	diff -u /tmp/a /tmp/b >/tmp/diff.txt && return 0
	echo "--- $1  +++ $2"
	cat /tmp/diff.txt
	return 1
}

# smoke-expected: pyvt's output is KVM's transcript, kvm_smoke.expected.
# Needs no nested KVM, so it holds in every boot.
smoke_expected() {
	if same_transcript /lib/kvm_smoke.expected /tmp/smoke-pyvt.txt; then
		result smoke-expected PASS "$(grep -c . /tmp/a) lines identical to kvm_smoke.expected"
	else
		result smoke-expected FAIL "output differs from KVM's transcript"
	fi
}

# smoke-compare: pyvt's output against the live reference's, in this
# boot; $1 names the reference.
smoke_compare() {
	if same_transcript /tmp/smoke-kvm.txt /tmp/smoke-pyvt.txt; then
		result smoke-compare PASS "$(grep -c . /tmp/a) lines identical to $1"
	else
		result smoke-compare FAIL "output differs from $1"
	fi
}

# hwcaps-dump: PYVT_GET_HW_CAPS as JSON on the console (run-in-bochs
# turns it into a report with `pyvt caps --hw-caps-json`).
hwcaps_dump() {
	if hwcaps_json >/tmp/hwcaps.txt 2>/tmp/hwcaps.err; then
		cat /tmp/hwcaps.txt
		result hwcaps-dump PASS "$(grep -c '"cpu":' /tmp/hwcaps.txt) CPUs dumped as JSON"
	else
		cat /tmp/hwcaps.err
		result hwcaps-dump FAIL "hwcaps_json failed"
	fi
}

# bench and hwcaps: bench ARGS... (it also checks PYVT_GET_HW_CAPS).
run_bench() {
	if timeout 600 bench "$@" >/tmp/bench.txt 2>&1; then
		cat /tmp/bench.txt
		result bench PASS "$(grep ratio /tmp/bench.txt | sed 's/BENCH //')"
		result hwcaps PASS "$(grep 'CAPS abi' /tmp/bench.txt | sed 's/CAPS //')"
	else
		cat /tmp/bench.txt
		result bench FAIL "benchmark failed"
		grep -q 'CAPS abi' /tmp/bench.txt &&
			! grep -q 'FAIL PYVT_GET_HW_CAPS' /tmp/bench.txt &&
			result hwcaps PASS "$(grep 'CAPS abi' /tmp/bench.txt | sed 's/CAPS //')"
	fi
}

# fuzz, fuzz-pages, smoke-after-fuzz: bad input, then no oops or warning,
# nothing held, still working.
fuzz_checks() {
	timeout 900 fuzz /dev/pyvt "${pyvt_fuzz_ops:-5000}" "${pyvt_fuzz_seed:-1}" >/tmp/fuzz.txt 2>&1
	rc=$?
	cat /tmp/fuzz.txt
	[ $rc = 0 ] && result fuzz PASS "$(grep 'calls' /tmp/fuzz.txt | sed 's/FUZZ //;s/;.*//')" ||
		result fuzz FAIL "exit $rc"
	pages=$(cat /sys/module/pyvt/parameters/live_pages)
	objects=$(cat /sys/module/pyvt/parameters/live_objects)
	[ "$pages" = 0 ] && [ "$objects" = 0 ] &&
		result fuzz-pages PASS "0 pages and 0 VMs/vCPUs held after all fds closed" ||
		result fuzz-pages FAIL "$pages pages, $objects VMs/vCPUs still held"
	timeout 300 kvm_smoke /dev/pyvt >/tmp/smoke-again.txt 2>&1
	if [ $? = 0 ] && diff /tmp/smoke-pyvt.txt /tmp/smoke-again.txt >/dev/null; then
		result smoke-after-fuzz PASS "same output as before the fuzzer"
	else
		diff -u /tmp/smoke-pyvt.txt /tmp/smoke-again.txt
		result smoke-after-fuzz FAIL "module misbehaves after fuzzing"
	fi
}

# hold_vm DEV SECONDS: a VM held open on DEV in the background (its pid
# in $holder), once it exists (at most 10 s).
hold_vm() {
	kvm_smoke --hold "$1" "$2" >/tmp/hold.txt 2>&1 &
	holder=$!
	for i in 1 2 3 4 5 6 7 8 9 10; do
		grep -q holding /tmp/hold.txt && return
		sleep 1
	done
}

# mount_host_root: the host's root, shared read-only over 9p, at
# /mnt/host with proc, sys, dev and a scratch tmpfs on /run inside (not
# /tmp: the checkout may live under /tmp), ready for chroot.
mount_host_root() {
	for m in virtio_pci 9pnet_virtio 9p; do modprobe $m; done
	mkdir -p /mnt/host
	mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /mnt/host || return 1
	mount -t proc proc /mnt/host/proc
	mount -t sysfs sys /mnt/host/sys
	mount -t devtmpfs dev /mnt/host/dev
	mount -t tmpfs scratch /mnt/host/run
}

# hotplug: CPU hotplug while a VM holds SVM/VMX on, then run on the
# re-onlined CPU; rmmod must refuse while a VM is open.  Needs 2 CPUs.
hotplug_check() {
	hold_vm /dev/pyvt 8
	rmmod pyvt 2>/dev/null && rmmod_open=unloaded || rmmod_open=refused
	echo 0 >/sys/devices/system/cpu/cpu1/online &&
		echo 1 >/sys/devices/system/cpu/cpu1/online
	taskset -c 1 kvm_smoke /dev/pyvt >/tmp/smoke-cpu1.txt 2>&1
	rc=$?
	wait $holder
	if [ $rc = 0 ] && [ $rmmod_open = refused ] &&
	   diff /tmp/smoke-pyvt.txt /tmp/smoke-cpu1.txt >/dev/null; then
		result hotplug PASS "cpu1 offlined/onlined with a VM open, smoke identical on cpu1; rmmod refused while open"
	else
		cat /tmp/hold.txt
		diff -u /tmp/smoke-pyvt.txt /tmp/smoke-cpu1.txt
		result hotplug FAIL "rc=$rc rmmod-while-open=$rmmod_open"
	fi
}

# dmesg and rmmod: the last two checks of every boot.
dmesg_rmmod_checks() {
	if bad_dmesg; then
		result dmesg FAIL "oops/warning in dmesg (above)"
	else
		result dmesg PASS "no oops, BUG or WARNING"
	fi
	if rmmod pyvt; then
		bad_dmesg >/dev/null && result rmmod FAIL "dmesg after rmmod" ||
			result rmmod PASS "module unloaded cleanly"
	else
		result rmmod FAIL "rmmod failed"
	fi
}
