# Protected mode: port I/O against Python handlers.
#   out 0x10: the bytes 1, 2, 3 one by one
#   in  0x11: one dword, stored at 0x5000
#   rep outsb to 0x12: "ABCD"
#   rep insb from 0x13: four bytes into 0x6000
	.code32
	.globl _start
_start:
	mov	$1, %al
	out	%al, $0x10
	mov	$2, %al
	out	%al, $0x10
	mov	$3, %al
	out	%al, $0x10
	mov	$0x11, %dx
	in	%dx, %eax
	mov	%eax, 0x5000
	mov	$letters, %esi
	mov	$4, %ecx
	mov	$0x12, %dx
	cld
	rep outsb
	mov	$0x6000, %edi
	mov	$4, %ecx
	mov	$0x13, %dx
	rep insb
	hlt

letters:
	.ascii	"ABCD"
