# A guest "function": reads n from 0x6000, stores n * n + 7 at 0x6008 and
# halts.  It has a planted bug for fuzzing: an n whose low byte is 0x42
# executes ud2, which with no IDT is a triple fault (KVM_EXIT_SHUTDOWN).
	.code64
	.globl _start
_start:
	mov	0x6000, %rcx
	mov	%rcx, %rax
	imul	%rcx, %rax
	add	$7, %rax
	mov	%rax, 0x6008
	cmp	$0x42, %cl
	jne	done
	ud2
done:
	hlt
