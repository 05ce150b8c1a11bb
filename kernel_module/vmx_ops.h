/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The VMX instructions pyvt uses, as inline wrappers, as Linux's KVM
 * keeps them.  VMREAD/VMWRITE act on the current VMCS.
 */
#ifndef PYVT_VMX_OPS_H
#define PYVT_VMX_OPS_H

#include <linux/types.h>
#include <asm/vmx.h>

static __always_inline u64 vmcs_read(unsigned long field)
{
	u64 value;

	asm volatile("vmread %1, %0" : "=r" (value) : "r" (field) : "cc");
	return value;
}

static __always_inline void vmcs_write(unsigned long field, u64 value)
{
	asm volatile("vmwrite %1, %0" : : "r" (field), "r" (value) : "cc");
}

/* A VMX instruction taking a physical address operand; true on VMfail. */
#define VMX_INSN_PA(insn, pa) ({					\
	bool __fail;							\
	asm volatile(insn " %1; setna %0" : "=qm" (__fail) : "m" (pa)	\
		     : "cc", "memory");					\
	__fail;								\
})

static inline bool vmxon(u64 pa)
{
	return VMX_INSN_PA("vmxon", pa);
}

static inline bool vmclear(u64 pa)
{
	return VMX_INSN_PA("vmclear", pa);
}

static inline bool vmptrld(u64 pa)
{
	return VMX_INSN_PA("vmptrld", pa);
}

static inline void ept_flush(int type, u64 eptp)
{
	struct { u64 eptp, gpa; } desc = { eptp, 0 };

	asm volatile("invept %0, %1" : : "m" (desc), "r" ((u64)type)
		     : "cc", "memory");
}

static inline void vpid_flush(int type, u16 vpid)
{
	struct { u64 vpid, gva; } desc = { vpid, 0 };

	asm volatile("invvpid %0, %1" : : "m" (desc), "r" ((u64)type)
		     : "cc", "memory");
}

#endif /* PYVT_VMX_OPS_H */
