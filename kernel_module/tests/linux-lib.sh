# SPDX-License-Identifier: GPL-2.0
# shellcheck shell=sh
#
# Sourced by vm-init (after init-lib.sh) for the "linux" boot of
# run-in-vm: boot Debian's stock kernel as a nested guest (L2) over
# Debian's kvm-amd, first under QEMU+KVM (the reference, which also proves
# the L2 initramfs and these checks), then under `pyvt boot`, with the same
# kernel, initramfs (l2-init) and devices: a virtio disk, a virtio NIC on a
# tap of this machine, virtio-rng, 2 vCPUs, the serial console both ways,
# power-off.  pyvt and QEMU run from the host's root shared over 9p.
#
# Kernel command line (set by run-in-vm): pyvt_repo, pyvt_python,
# pyvt_pythonpath (the checkout, when its native modules are built in
# place), pyvt_l2_initrd, pyvt_l2_end (poweroff, the default, or reboot).
#
# Results: linux-boot linux-disk linux-net linux-rng linux-console
# linux-smp linux-poweroff (pyvt's run) and linux-vs-qemu (guest uptimes
# at init and at the end under both, and their ratio); then two short
# boots: linux-hvc (`pyvt boot --console virtio`, console=hvc0: the
# terminal both ways through Linux's hvc0) and linux-example
# (examples/virtio_rng.py: /dev/hwrng served by a device written in Python).

HOST=/mnt/host
TAP=pyvt0
L1_ADDR=10.0.2.1

# l2_append TOKEN [MODE [CONSOLE]]: the L2 command line; l2_token makes
# each run's disk and console data unique, l2_mode chooses l2-init's checks,
# CONSOLE is a second console= (the last one is where the kernel's messages
# go once its driver is up; ttyS0 shows them before that).
l2_append() {
	echo "console=ttyS0${3:+ console=$3} panic=-1 quiet loglevel=4 l2_token=$1" \
		"l2_end=${pyvt_l2_end:-poweroff}${2:+ l2_mode=$2}"
}

# in_host CMD: CMD (a string for sh -c) in the host root, with a clean
# environment, as the pytest boots run Python.
in_host() {
	chroot $HOST /usr/bin/env -i HOME=/run TMPDIR=/run \
		PATH="$(dirname "$pyvt_python"):/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin" \
		PYTHONPATH="$pyvt_pythonpath" PYTHONDONTWRITEBYTECODE=1 PYTHONFAULTHANDLER=1 \
		sh -c "$1"
}

# l2_lines FILE: the PYVT-L2 lines of an L2 console log, without the
# kernel's timestamps; complete lines only (the guest may be writing one).
l2_lines() {
	head -n "$(wc -l <"$1")" "$1" | sed -n 's/^.*\(PYVT-L2 .*\)$/\1/p' | tr -d '\r'
}

# l2_value FILE NAME: the rest of the first "PYVT-L2 NAME ..." line.
l2_value() {
	l2_lines "$1" | sed -n "s/^PYVT-L2 $2 //p" | head -1
}

# run_l2 WHO TOKEN CMD: one L2 boot (CMD run in the host root with the
# console on stdin/stdout), its console in $HOST/run/l2-WHO.txt, its exit
# status in L2_RC and wall time in L2_WALL.  A fresh 8 MiB disk image
# starts with the pattern the guest must read; the guest's console
# input is sent once it says console-ready.  Shows the L2 lines as they
# come (the run's progress, which run-in-vm's hang watch sees).
run_l2() {
	local who=$1 token=$2 cmd=$3 out fifo=$HOST/run/l2-in t0 pid feeder shown=0 n

	out=$HOST/run/l2-$who.txt # (local expands every word before it assigns)

	dd if=/dev/zero of=$HOST/run/disk.img bs=1M count=8 2>/dev/null
	printf 'PYVT-DISK-PATTERN-%s' "$token" | dd of=$HOST/run/disk.img conv=notrunc 2>/dev/null
	rm -f "$fifo" && mkfifo "$fifo"
	: >"$out"
	(
		exec 3>"$fifo"
		for i in $(seq 1 700); do
			grep -q 'PYVT-L2 console-ready' "$out" && break
			sleep 1
		done
		echo "hello from l1 $token" >&3
		sleep 30
	) &
	feeder=$!
	t0=$(date +%s)
	in_host "$cmd" <"$fifo" >"$out" 2>&1 &
	pid=$!
	while kill -0 $pid 2>/dev/null; do
		sleep 5
		n=$(l2_lines "$out" | wc -l)
		if [ "$n" -gt "$shown" ]; then
			l2_lines "$out" | tail -n $((n - shown)) | sed "s/^/PYVT-INFO $who: /"
			shown=$n
		elif [ $((($(date +%s) - t0) % 60)) -lt 5 ]; then
			# This machine still runs (a nested kvm-amd hang stops it);
			# the run's own timeout bounds a guest that makes no progress.
			echo "PYVT-INFO $who: running for $(($(date +%s) - t0)) s"
		fi
	done
	wait $pid
	L2_RC=$?
	L2_WALL=$(($(date +%s) - t0))
	kill $feeder 2>/dev/null
	wait $feeder 2>/dev/null
	l2_lines "$out" | tail -n +$((shown + 1)) | sed "s/^/PYVT-INFO $who: /"
	echo "PYVT-INFO $who: exit status $L2_RC after $L2_WALL s wall"
	# The whole L2 console, kept in the serial log for a closer look
	# (run-in-vm shows only the PYVT lines).
	tr -d '\r' <"$out" | sed "s/^/L2LOG $who: /"
}

# uptime_of FILE start|devices|end: the guest's uptime in seconds at init,
# after the device checks (before the console's), at power-off.
uptime_of() {
	l2_lines "$1" | sed -n "s/^PYVT-L2 $2 uptime=//p" | head -1
}

# judge_l2 FILE TOKEN RC: the device results of one run, as
# "name PASS|FAIL detail" lines.
judge_l2() {
	local out=$1 token=$2 rc=$3 v

	v=$(uptime_of "$out" start)
	if [ -n "$v" ]; then echo "linux-boot PASS init at $v s of guest uptime"
	else echo "linux-boot FAIL init never ran ($(grep -a -m1 -iE 'panic|error|pyvt:' "$out"))"; fi
	v=$(l2_value "$out" disk-read)
	if [ "$v" = "PYVT-DISK-PATTERN-$token" ] &&
	   dd if=$HOST/run/disk.img bs=512 skip=8 count=1 2>/dev/null | grep -q "PYVT-L2-WROTE-$token"; then
		echo "linux-disk PASS read the pattern, wrote one L1 read back"
	else
		echo "linux-disk FAIL read '${v:-nothing}'; $(dd if=$HOST/run/disk.img bs=512 skip=8 count=1 2>/dev/null | tr -d '\0' | head -c 40)"
	fi
	v=$(l2_value "$out" ping)
	case $v in ok*) echo "linux-net PASS pinged $L1_ADDR: ${v#ok }" ;;
	*) echo "linux-net FAIL ${v:-no ping result}" ;; esac
	v=$(l2_value "$out" hwrng)
	case $v in 64\ bytes*) echo "linux-rng PASS $v" ;;
	*) echo "linux-rng FAIL ${v:-no hwrng result}" ;; esac
	echo "linux-console $(console_verdict "$out" "$token")"
	v=$(l2_value "$out" cpus)
	if [ "$v" = 2 ]; then echo "linux-smp PASS 2 CPUs"
	else echo "linux-smp FAIL ${v:-no} CPUs"; fi
	v=$(uptime_of "$out" end)
	if [ -n "$v" ] && [ "$rc" = 0 ] && [ "${pyvt_l2_end:-poweroff}" = poweroff ]; then
		echo "linux-poweroff PASS poweroff -f at $v s ended the run with status 0"
	else
		echo "linux-poweroff FAIL end ${v:-not reached}, status $rc, ended by ${pyvt_l2_end:-poweroff}"
	fi
}

# console_verdict FILE TOKEN: "PASS|FAIL detail" for the console check of
# one run (L1's line read by the guest, echoed back in capitals).
console_verdict() {
	local v

	v=$(l2_value "$1" console-read)
	# A kernel message may still cut the echo in two on a loaded machine
	# ("PYVT-L2-ECHO HEL[   16.26] PYVT-L2 ...<newline>LO FROM L1"): the echo
	# is looked for with kernel messages taken out and the lines joined.
	if [ "$v" = "hello from l1 $2" ] &&
	   sed -E 's/\[ *[0-9]+\.[0-9]+\] .*$//' "$1" | tr -d '\r\n' |
	   grep -q "PYVT-L2-ECHO $(echo "hello from l1 $2" | tr a-z A-Z)"; then
		echo "PASS the guest read L1's line and echoed it in capitals"
	else
		echo "FAIL read '${v:-nothing}'$(grep -q "PYVT-L2-ECHO" "$1" || echo ', no echo')"
	fi
}

# pyvt_boot_cmd TOKEN MODE CONSOLE OPTIONS...: the command for a `pyvt boot`
# of the L2 kernel and initramfs.
pyvt_boot_cmd() {
	local token=$1 mode=$2 console=$3

	shift 3
	echo "cd /run && exec timeout 700 '$pyvt_python' -P -m pyvt boot /boot/vmlinuz-$(uname -r)" \
		"--initrd $pyvt_l2_initrd --append '$(l2_append "$token" "$mode" "$console")'" \
		"--memory 256M $* --timeout 600"
}

# hvc_check: `pyvt boot --console virtio` with console=hvc0 (no disk or
# NIC: only what the console needs); the terminal's line must go to the
# guest through hvc0 and the echo come back through it.
hvc_check() {
	local out=$HOST/run/l2-hvc.txt token=h$$ v

	run_l2 hvc $token "$(pyvt_boot_cmd $token hvc hvc0 --console virtio)"
	v=$(console_verdict "$out" $token)
	if [ "$L2_RC" = 0 ] && [ -n "$(uptime_of "$out" end)" ]; then
		result linux-hvc ${v%% *} "${v#* } through hvc0, then powered off ($L2_WALL s wall)"
	else
		result linux-hvc FAIL "status $L2_RC, end $(uptime_of "$out" end); console: $v"
	fi
}

# example_check: examples/virtio_rng.py from the checkout boots the L2
# kernel; the guest's /dev/hwrng must be the example's Python device
# (virtio_rng) and give bytes, and the example must count them and exit 0.
example_check() {
	local out=$HOST/run/l2-example.txt token=e$$ v avail served cmd

	cmd="cd /run && exec timeout 700 '$pyvt_python' -P '$pyvt_repo/examples/virtio_rng.py'"
	cmd="$cmd /boot/vmlinuz-$(uname -r) $pyvt_l2_initrd --append '$(l2_append $token example)'"
	run_l2 example $token "$cmd"
	v=$(l2_value "$out" hwrng)
	avail=$(l2_value "$out" hwrng-available)
	served=$(sed -n 's/.*the guest took \([0-9]*\) random bytes.*/\1/p' "$out" | tail -1)
	if [ "${v#64 bytes from virtio_rng}" != "$v" ] && [ "$L2_RC" = 0 ] && [ "${served:-0}" -gt 0 ] &&
	   [ -n "$(l2_value "$out" hwrng-hex)" ]; then
		result linux-example PASS "/dev/hwrng: $v (available: $avail); the example served $served bytes, status 0 ($L2_WALL s wall)"
	else
		result linux-example FAIL "hwrng '$(l2_value "$out" hwrng)' (available: '${avail}'), example served '${served:-?}' bytes, status $L2_RC"
	fi
}

linux_checks() {
	local kernel=/boot/vmlinuz-$(uname -r) append qemu_cmd pyvt_cmd devices="" q_out p_out
	local q0 q1 qd p0 p1 pd token

	if ! modprobe kvm_amd nested=1 || [ ! -c /dev/kvm ]; then
		for r in linux-boot linux-disk linux-net linux-rng linux-console linux-smp \
			linux-poweroff linux-vs-qemu linux-hvc linux-example; do
			result $r FAIL "kvm_amd did not load"
		done
		return
	fi
	echo "PYVT-INFO reference steps start"
	# One kvm VM held open keeps SVM on (see vm-init's kvm-ref).
	hold_vm /dev/kvm 3000
	modprobe tun
	mount_host_root || {
		result linux-boot FAIL "9p mount of the host root failed"
		return
	}
	tunctl -t $TAP >/dev/null && ip addr add $L1_ADDR/24 dev $TAP && ip link set $TAP up

	token=q$$
	qemu_cmd="exec timeout 600 qemu-system-x86_64 -enable-kvm -cpu host -smp 2 -m 256M"
	qemu_cmd="$qemu_cmd -nodefaults -display none -no-reboot -serial stdio"
	qemu_cmd="$qemu_cmd -kernel $kernel -initrd $pyvt_l2_initrd -append '$(l2_append $token)'"
	qemu_cmd="$qemu_cmd -drive file=/run/disk.img,format=raw,if=none,id=d0 -device virtio-blk-pci,drive=d0"
	qemu_cmd="$qemu_cmd -netdev tap,id=n0,ifname=$TAP,script=no,downscript=no -device virtio-net-pci,netdev=n0"
	qemu_cmd="$qemu_cmd -device virtio-rng-pci"
	run_l2 qemu $token "$qemu_cmd"
	judge_l2 $HOST/run/l2-qemu.txt $token $L2_RC | sed 's/^/PYVT-INFO qemu reference: /'
	q_out=$(judge_l2 $HOST/run/l2-qemu.txt $token $L2_RC | grep -c ' PASS ')
	q0=$(uptime_of $HOST/run/l2-qemu.txt start)
	q1=$(uptime_of $HOST/run/l2-qemu.txt end)
	qd=$(uptime_of $HOST/run/l2-qemu.txt devices)
	cp $HOST/run/l2-qemu.txt /tmp/

	token=p$$
	run_l2 pyvt $token "$(pyvt_boot_cmd $token "" "" --smp 2 --disk /run/disk.img --net tap:$TAP --rng)"
	judge_l2 $HOST/run/l2-pyvt.txt $token $L2_RC | while read -r name verdict detail; do
		result "$name" "$verdict" "$detail"
	done
	grep -a 'pyvt:' $HOST/run/l2-pyvt.txt | tail -3 | sed 's/^/PYVT-INFO pyvt said: /'
	p0=$(uptime_of $HOST/run/l2-pyvt.txt start)
	p1=$(uptime_of $HOST/run/l2-pyvt.txt end)
	pd=$(uptime_of $HOST/run/l2-pyvt.txt devices)

	if [ -n "$q0" ] && [ -n "$q1" ] && [ -n "$p0" ] && [ -n "$p1" ] && [ "$q_out" = 7 ]; then
		result linux-vs-qemu PASS "$(awk -v p0=$p0 -v pd=${pd:-0} -v p1=$p1 -v q0=$q0 -v qd=${qd:-0} -v q1=$q1 'BEGIN {
			printf "guest uptime at init / after the device checks / at power-off: pyvt %.2f / %.2f / %.2f s, qemu %.2f / %.2f / %.2f s; pyvt/qemu %.2f / %.2f / %.2f", p0, pd, p1, q0, qd, q1, p0 / q0, pd / qd, p1 / q1 }')"
	else
		result linux-vs-qemu FAIL "pyvt init ${p0:-?} end ${p1:-?} s, qemu init ${q0:-?} end ${q1:-?} s ($q_out of 7 QEMU checks passed)"
	fi

	hvc_check
	example_check
	kill $holder 2>/dev/null
}
