# SPDX-License-Identifier: GPL-2.0
# shellcheck shell=bash
#
# Shared by run-in-vm (QEMU TCG, AMD-V) and run-in-bochs (Bochs, Intel
# VT-x): installing packages, building pyvt.ko and the static test
# programs, packing an initramfs, and judging a boot by its serial log.
#
# The sourcing script sets HERE (this directory), MODDIR (kernel_module/),
# BUILD (output directory) and defines log(); pick_kernel's result goes
# in KVER, which the later steps use.

# install_deps [qemu] [bochs]: install, with apt-get, what is missing
# for building the module and programs and for the emulators named.
install_deps() {
	local need=() emu

	ls /usr/src/linux-headers-*-amd64/Makefile >/dev/null 2>&1 ||
		need+=(linux-headers-amd64)
	ls /boot/vmlinuz-*-amd64 >/dev/null 2>&1 || need+=(linux-image-amd64)
	[ -x /bin/busybox ] && /bin/busybox --list | grep -qx modprobe ||
		need+=(busybox-static)
	command -v cpio >/dev/null || need+=(cpio)
	command -v gcc >/dev/null || need+=(gcc libc6-dev)
	command -v make >/dev/null || need+=(make)
	for emu in "$@"; do
		case $emu in
		qemu)
			command -v qemu-system-x86_64 >/dev/null ||
				need+=(qemu-system-x86)
			;;
		bochs)
			# Debian's bochs starts in its debugger and needs the
			# BIOS images from two more packages; grub-mkrescue
			# (grub-common, pulled in by grub-pc-bin) needs xorriso
			# and mtools to write the ISO.
			command -v bochs-bin >/dev/null || need+=(bochs)
			[ -f /usr/share/bochs/BIOS-bochs-latest ] ||
				need+=(bochsbios)
			[ -f /usr/share/vgabios/vgabios.bin ] || need+=(vgabios)
			command -v xorriso >/dev/null || need+=(xorriso)
			[ -d /usr/lib/grub/i386-pc ] || need+=(grub-pc-bin)
			command -v mformat >/dev/null || need+=(mtools)
			;;
		*)
			echo "install_deps: unknown emulator $emu" >&2
			return 1
			;;
		esac
	done
	if [ ${#need[@]} -gt 0 ]; then
		log "installing ${need[*]}"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
	fi
}

# Newest kernel version with both headers and an image.
pick_kernel() {
	local v h

	for h in $(ls -d /usr/src/linux-headers-*-amd64 | sort -V -r); do
		v=${h#/usr/src/linux-headers-}
		if [ -f /boot/vmlinuz-$v ] && [ -d /lib/modules/$v/kernel ]; then
			echo "$v"
			return
		fi
	done
	echo "no kernel with headers, image and modules found" >&2
	exit 1
}

# Build pyvt.ko from a copy of the sources, so the checkout stays clean;
# any compiler warning fails the build.
build_module() {
	local out=$BUILD/module

	rm -rf "$out"
	mkdir -p "$out"
	cp -r "$MODDIR"/Kbuild "$MODDIR"/*.c "$MODDIR"/*.h "$MODDIR"/*.S \
		"$MODDIR"/include "$out"/
	if ! make -C /usr/src/linux-headers-$KVER M="$out" modules \
		>"$BUILD/module-build.log" 2>&1; then
		cat "$BUILD/module-build.log"
		return 1
	fi
	if grep -E 'warning:|error:' "$BUILD/module-build.log"; then
		log "module build produced warnings"
		return 1
	fi
}

# build_programs NAME...: static test programs from tests/NAME.c; those
# that run guests link the guest programs of guests.S.
build_programs() {
	local p extra

	for p in "$@"; do
		extra=""
		grep -q '"guests.h"' "$HERE/$p.c" && extra="$HERE/guests.S"
		gcc -O2 -Wall -Wextra -Wno-sign-compare -Werror -static -pthread \
			-o "$BUILD/$p" "$HERE/$p.c" $extra
	done
}

# Copy a module and everything it depends on, per modules.dep.
copy_module() {
	local name=$1 root=$2 line path

	line=$(grep -E "(^|/)${name}\.ko:" /lib/modules/$KVER/modules.dep) || {
		log "module $name not found (built in?)"
		return 0
	}
	for path in ${line%%:*} ${line#*:}; do
		mkdir -p "$root/lib/modules/$KVER/$(dirname "$path")"
		cp "/lib/modules/$KVER/$path" "$root/lib/modules/$KVER/$path"
	done
}

# initramfs_base ROOT INIT PROGRAM...: busybox, pyvt.ko, the programs
# (from $BUILD), modules.dep, INIT as /init, and in /lib init-lib.sh and
# kvm_smoke.expected (the transcript the smoke checks compare against).
# The caller adds the modules it needs with copy_module, then packs.
initramfs_base() {
	local root=$1 init=$2 m

	shift 2
	rm -rf "$root"
	mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,mnt,lib/modules/$KVER}
	cp /bin/busybox "$root/bin/busybox"
	for m in $(/bin/busybox --list); do
		[ -e "$root/bin/$m" ] || ln -s busybox "$root/bin/$m"
	done
	cp "$BUILD/module/pyvt.ko" "$root/bin/"
	for m in "$@"; do cp "$BUILD/$m" "$root/bin/"; done
	cp /lib/modules/$KVER/modules.dep "$root/lib/modules/$KVER/"
	cp "$init" "$root/init"
	cp "$HERE/init-lib.sh" "$HERE/kvm_smoke.expected" "$root/lib/"
	chmod +x "$root/init"
}

# pack_initramfs ROOT OUT: a gzip'd newc cpio (gzip -1: the guest
# kernel unpacking it is the slow part, not the size).
pack_initramfs() {
	(cd "$1" && find . | cpio -o -H newc --quiet | gzip -1) >"$2"
}

# print_results SERIAL EXPECTED...: one line per expected result from the
# "PYVT-RESULT <name> PASS|FAIL <detail>" lines of a serial log (the last
# line of a name wins); returns 1 if any is missing or not PASS, or the
# log has no PYVT-DONE (the VM did not finish).
print_results() {
	local serial=$1 name line fail=0

	shift
	for name in "$@"; do
		line=$(grep -E "^PYVT-RESULT $name " "$serial" | tail -1) || true
		if [ -z "$line" ]; then
			printf '  %-18s MISSING\n' "$name"
			fail=1
		else
			set -- $line
			printf '  %-18s %s %s\n' "$name" "$3" "${*:4}"
			[ "$3" = PASS ] || fail=1
		fi
	done
	if ! grep -q '^PYVT-DONE' "$serial"; then
		echo "  (the VM did not finish; see $serial)"
		fail=1
	fi
	return $fail
}

# The test output worth showing from a serial log (the kernel's own boot
# messages are left out).
show_test_output() {
	grep -E '^(PYVT|BENCH|CAPS|FUZZ|  |== |# |FAIL|---|\+\+\+|[-+@])' "$1" || true
}
