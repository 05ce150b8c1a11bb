# The smallest guest: stop at once (VM spawn benchmark).
	.code16
	.globl _start
_start:
	hlt
