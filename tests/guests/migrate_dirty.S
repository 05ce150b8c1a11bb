# A guest for the live-migration tests (ring 3, long mode, flat).
# It prints numbered lines and keeps writing memory while it runs, keeping
# the sum of the buffer's qwords in r12; at the end it sums the buffer
# again and ends with isa-debug-exit: code 0 when all is well, bit 0 set if
# its memory lost a write, bit 1 if the Python-handled device's count is
# not its own (see tests/test_migration.py for the registers it takes).
    .code64
    xor %r15, %r15
    xor %r12, %r12
    movabs $0x9E3779B97F4A7C15, %rbx
line:
    cmp %rbp, %r15
    jae done
    mov %r8, %rcx
1:  mov %rbx, %rax; shl $13, %rax; xor %rax, %rbx
    mov %rbx, %rax; shr $7, %rax; xor %rax, %rbx
    mov %rbx, %rax; shl $17, %rax; xor %rax, %rbx
    mov %rbx, %rax; and %rsi, %rax; shl $12, %rax; add %rdi, %rax
    mov %rbx, %rdx; shr $20, %rdx; and $0xff8, %rdx; add %rdx, %rax
    sub (%rax), %r12
    mov %rbx, (%rax)
    add %rbx, %r12
    dec %rcx
    jnz 1b
    test %r14, %r14
    jz 2f
    mov %r14, %rdx
    out %al, %dx
2:  mov %r11, %rdx
    mov %r10, %rax
    out %al, %dx
    mov $20, %rcx
3:  sub $4, %rcx
    mov %r15, %rax
    shr %cl, %rax
    and $15, %eax
    cmp $10, %eax
    jb 4f
    add $39, %eax
4:  add $48, %eax
    out %al, %dx
    test %rcx, %rcx
    jnz 3b
    mov $10, %al
    out %al, %dx
    mov %r9, %rcx
5:  dec %rcx
    jnz 5b
    inc %r15
    jmp line
done:
    xor %eax, %eax
    mov %rdi, %rdx
    mov %rsi, %rcx
    inc %rcx
    shl $9, %rcx
6:  add (%rdx), %rax
    add $8, %rdx
    dec %rcx
    jnz 6b
    xor %r8, %r8
    cmp %rax, %r12
    je 7f
    or $1, %r8
7:  test %r14, %r14
    jz 8f
    mov %r14, %rdx
    in %dx, %eax
    cmp %r15d, %eax
    je 8f
    or $2, %r8
8:  test %r13, %r13
    jz 11f
    test $1, %r13
    jnz 10f
    mov %r8, 8(%r13)
    movq $1, (%r13)
9:  pause
    jmp 9b
10: and $-2, %r13
12: pause
    cmpq $1, (%r13)
    jne 12b
    or 8(%r13), %r8
11: mov $0xf4, %dx
    mov %r8d, %eax
    out %al, %dx
    hlt
