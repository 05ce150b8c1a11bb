# Long mode: run a script of port accesses that the host wrote at 0x3000 and
# store what each read returned at 0x8000, then hlt.  The tests use it to
# drive the native PC devices (fw_cfg, CMOS, PM timer, i8042, port 0x80)
# exactly as a guest kernel would, and to check what the guest saw.
#
# A script entry is 8 bytes: u8 op, u8 0, u16 port, u32 value.
#   0 end (hlt)       1 outb value      2 outw value      3 outl value
#   4 inb (u32 out)   5 inw (u32 out)   6 inl (u32 out)
#   7 rep insb: value bytes into the output, as they are
#   8 spin: a delay loop of value iterations
	.code64
	.globl _start
_start:
	mov	$0x3000, %rsi		# script
	mov	$0x8000, %rdi		# output
next:
	movzbl	(%rsi), %eax		# op
	movzwl	2(%rsi), %edx		# port
	mov	4(%rsi), %ecx		# value
	add	$8, %rsi
	cmp	$0, %eax
	je	done
	cmp	$1, %eax
	je	out_b
	cmp	$2, %eax
	je	out_w
	cmp	$3, %eax
	je	out_l
	cmp	$4, %eax
	je	in_b
	cmp	$5, %eax
	je	in_w
	cmp	$6, %eax
	je	in_l
	cmp	$7, %eax
	je	ins_b
	cmp	$8, %eax
	je	spin
	mov	$0xbad, %eax		# unknown op: stop where the host sees it
	hlt
out_b:
	mov	%ecx, %eax
	out	%al, %dx
	jmp	next
out_w:
	mov	%ecx, %eax
	out	%ax, %dx
	jmp	next
out_l:
	mov	%ecx, %eax
	out	%eax, %dx
	jmp	next
in_b:
	xor	%eax, %eax
	in	%dx, %al
	jmp	store
in_w:
	xor	%eax, %eax
	in	%dx, %ax
	jmp	store
in_l:
	in	%dx, %eax
store:
	mov	%eax, (%rdi)
	add	$4, %rdi
	jmp	next
ins_b:
	rep insb
	jmp	next
spin:
	dec	%ecx
	jnz	spin
	jmp	next
done:
	hlt
