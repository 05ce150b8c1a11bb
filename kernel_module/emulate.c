// SPDX-License-Identifier: GPL-2.0
/*
 * The little instruction emulation a driver without decode assists needs:
 * guest page-table walks, string port I/O and the common MOV forms that
 * touch MMIO.  Anything else becomes KVM_EXIT_INTERNAL_ERROR.
 */
#include <linux/mm.h>
#include <asm/processor-flags.h>
#include <asm/msr-index.h>
#include "core.h"

#define PTE_PRESENT	BIT_ULL(0)
#define PTE_LARGE	BIT_ULL(7)
#define PTE_ADDR_MASK	GENMASK_ULL(51, 12)
#define MAX_INSN_LEN	15

/* Guest linear address -> guest physical, by walking the guest's tables. */
static int guest_walk(struct pyvt_vcpu *vcpu, const struct kvm_sregs *s,
		      u64 la, u64 *gpa)
{
	struct pyvt_vm *vm = vcpu->vm;
	u64 table, pte = 0;
	int level, top;
	u32 pte32;

	if (!(s->cr0 & X86_CR0_PG)) {
		*gpa = (s->efer & EFER_LMA) ? la : (u32)la;
		return 0;
	}

	if (!(s->efer & EFER_LMA) && !(s->cr4 & X86_CR4_PAE)) {
		la = (u32)la;
		if (pyvt_read_gpa(vm, (s->cr3 & 0xfffff000) + (la >> 22) * 4,
				  &pte32, 4) || !(pte32 & PTE_PRESENT))
			return -EFAULT;
		if ((pte32 & PTE_LARGE) && (s->cr4 & X86_CR4_PSE)) {
			*gpa = (pte32 & 0xffc00000) | (la & 0x3fffff);
			return 0;
		}
		if (pyvt_read_gpa(vm, (pte32 & 0xfffff000) +
				  ((la >> 12) & 0x3ff) * 4, &pte32, 4) ||
		    !(pte32 & PTE_PRESENT))
			return -EFAULT;
		*gpa = (pte32 & 0xfffff000) | (la & 0xfff);
		return 0;
	}

	if (s->efer & EFER_LMA) {
		top = (s->cr4 & X86_CR4_LA57) ? 5 : 4;
		table = s->cr3 & PTE_ADDR_MASK;
	} else {
		/* PAE: the PDPTE picked by bits 31:30, then two levels. */
		la = (u32)la;
		if (pyvt_read_gpa(vm, (s->cr3 & 0xffffffe0) + (la >> 30) * 8,
				  &pte, 8) || !(pte & PTE_PRESENT))
			return -EFAULT;
		table = pte & PTE_ADDR_MASK;
		top = 2;
	}

	for (level = top; level >= 1; level--) {
		int shift = 12 + 9 * (level - 1);

		if (pyvt_read_gpa(vm, table + ((la >> shift) & 511) * 8,
				  &pte, 8) || !(pte & PTE_PRESENT))
			return -EFAULT;
		if (level == 1 || (level <= 3 && (pte & PTE_LARGE))) {
			u64 mask = BIT_ULL(shift) - 1;

			*gpa = (pte & PTE_ADDR_MASK & ~mask) | (la & mask);
			return 0;
		}
		table = pte & PTE_ADDR_MASK;
	}
	return -EFAULT;
}

static int access_linear(struct pyvt_vcpu *vcpu, const struct kvm_sregs *s,
			 u64 la, void *buf, unsigned int len, bool write)
{
	while (len) {
		unsigned int n = min_t(unsigned int, len,
				       PAGE_SIZE - offset_in_page(la));
		u64 gpa;
		int ret;

		ret = guest_walk(vcpu, s, la, &gpa);
		if (ret)
			return ret;
		if (write)
			ret = pyvt_write_gpa(vcpu->vm, gpa, buf, n);
		else
			ret = pyvt_read_gpa(vcpu->vm, gpa, buf, n);
		if (ret)
			return ret;
		la += n;
		buf += n;
		len -= n;
	}
	return 0;
}

int pyvt_read_guest_linear(struct pyvt_vcpu *vcpu, const struct kvm_sregs *s,
			   u64 la, void *buf, unsigned int len)
{
	return access_linear(vcpu, s, la, buf, len, false);
}

int pyvt_write_guest_linear(struct pyvt_vcpu *vcpu, const struct kvm_sregs *s,
			    u64 la, const void *buf, unsigned int len)
{
	return access_linear(vcpu, s, la, (void *)buf, len, true);
}

static bool long_mode_code(const struct kvm_sregs *s)
{
	return (s->efer & EFER_LMA) && s->cs.l;
}

static void emulation_failed(struct pyvt_vcpu *vcpu, u64 gpa,
			     const u8 *insn, int len)
{
	u64 data[4] = { vcpu->rip, gpa, 0, 0 };

	memcpy(&data[2], insn, min(len, 16));
	pyvt_internal_error(vcpu, KVM_INTERNAL_ERROR_EMULATION, 4, data);
}

/* Fetch up to 15 bytes at CS:rIP; returns how many could be read. */
static int fetch_insn(struct pyvt_vcpu *vcpu, const struct kvm_sregs *s,
		      u8 *insn)
{
	u64 la = vcpu->rip + (long_mode_code(s) ? 0 : s->cs.base);
	unsigned int first = PAGE_SIZE - offset_in_page(la);

	memset(insn, 0, MAX_INSN_LEN);
	if (first >= MAX_INSN_LEN)
		return pyvt_read_guest_linear(vcpu, s, la, insn,
					      MAX_INSN_LEN) ? 0 : MAX_INSN_LEN;
	if (pyvt_read_guest_linear(vcpu, s, la, insn, first))
		return 0;
	if (pyvt_read_guest_linear(vcpu, s, la + first, insn + first,
				   MAX_INSN_LEN - first))
		return first;
	return MAX_INSN_LEN;
}

/* Write @val to a register the way an operand of @size does. */
static void set_reg_sized(unsigned long *reg, u64 val, int size, bool high)
{
	switch (size) {
	case 1:
		if (high)
			*reg = (*reg & ~0xff00UL) | ((val & 0xff) << 8);
		else
			*reg = (*reg & ~0xffUL) | (val & 0xff);
		break;
	case 2:
		*reg = (*reg & ~0xffffUL) | (val & 0xffff);
		break;
	case 4:
		*reg = (u32)val;
		break;
	default:
		*reg = val;
	}
}

static u64 addr_mask(int addr_size)
{
	return addr_size == 8 ? ~0ULL : BIT_ULL(addr_size * 8) - 1;
}

/* rSI/rDI/rCX step as wide as the address size; upper bits per mode. */
static void set_reg_addr(unsigned long *reg, u64 val, int addr_size)
{
	set_reg_sized(reg, val, addr_size, false);
}

static u64 seg_base(const struct kvm_sregs *s, int seg)
{
	const struct kvm_segment *segs[] = {
		&s->es, &s->cs, &s->ss, &s->ds, &s->fs, &s->gs,
	};

	if (long_mode_code(s) && seg < 4)
		return 0;
	return segs[seg]->base;
}

/* The segment an OUTS reads through: DS unless a prefix overrides it. */
static int outs_segment(struct pyvt_vcpu *vcpu, const struct kvm_sregs *s)
{
	static const u8 seg_prefix[] = { 0x26, 0x2e, 0x36, 0x3e, 0x64, 0x65 };
	u8 insn[MAX_INSN_LEN];
	int i, j, n, seg = 3;

	n = fetch_insn(vcpu, s, insn);
	for (i = 0; i < n; i++) {
		for (j = 0; j < ARRAY_SIZE(seg_prefix); j++)
			if (insn[i] == seg_prefix[j])
				seg = j;
		if (insn[i] == 0x6e || insn[i] == 0x6f)
			break;
	}
	return seg;
}

int pyvt_emulate_io(struct pyvt_vcpu *vcpu, u16 port, u8 size, bool in,
		    bool string, bool rep, u8 addr_size, u64 next_rip)
{
	struct kvm_run *run = vcpu->run;
	void *data = page_address(vcpu->run_pages[1]);
	struct pyvt_pending_op *p = &vcpu->pending;
	struct kvm_sregs s;
	u64 amask = addr_mask(addr_size), count = 1, la, si;
	bool df = vcpu->rflags & X86_EFLAGS_DF;
	u32 n = 1;

	if (string) {
		if (rep)
			count = vcpu->gprs[PYVT_RCX] & amask;
		if (!count) {
			vcpu->rip = next_rip;
			return 1;
		}
		/*
		 * As KVM does: OUTS hands user space one element per exit
		 * (a handler that fails mid-string loses nothing); INS reads
		 * ahead up to 1 KiB.  Backwards strings go one at a time.
		 */
		if (in && !df)
			n = min_t(u64, count, 1024 / size);
	}

	run->exit_reason = KVM_EXIT_IO;
	run->io.direction = in ? KVM_EXIT_IO_IN : KVM_EXIT_IO_OUT;
	run->io.size = size;
	run->io.port = port;
	run->io.count = n;
	run->io.data_offset = PYVT_PIO_DATA_OFFSET;

	memset(p, 0, sizeof(*p));
	p->rip = vcpu->rip;
	p->next_rip = next_rip;
	p->size = size;
	p->count = n;
	p->addr_size = addr_size;
	p->rep = rep;

	if (!string) {
		if (!in)
			memcpy(data, &vcpu->gprs[PYVT_RAX], size);
		p->kind = in ? PYVT_PENDING_PIO_IN : PYVT_PENDING_PIO_OUT;
		return 0;
	}
	if (in) {
		p->kind = PYVT_PENDING_INS;
		return 0;
	}

	/* OUTS: the data and the register updates are final right now. */
	pyvt_ops->get_sregs(vcpu, &s);
	si = vcpu->gprs[PYVT_RSI] & amask;
	la = seg_base(&s, outs_segment(vcpu, &s)) + si;
	if (!long_mode_code(&s))
		la = (u32)la;
	if (pyvt_read_guest_linear(vcpu, &s, la, data, n * size)) {
		u8 insn[MAX_INSN_LEN] = {};

		emulation_failed(vcpu, la, insn, 0);
		return 0;
	}
	set_reg_addr(&vcpu->gprs[PYVT_RSI],
		     df ? si - n * size : si + n * size, addr_size);
	if (rep)
		set_reg_addr(&vcpu->gprs[PYVT_RCX], count - n, addr_size);
	if (!rep || count == n)
		vcpu->rip = next_rip;
	return 0;
}

static int complete_ins(struct pyvt_vcpu *vcpu)
{
	struct pyvt_pending_op *p = &vcpu->pending;
	void *data = page_address(vcpu->run_pages[1]);
	u64 amask = addr_mask(p->addr_size), di, la, count;
	bool df = vcpu->rflags & X86_EFLAGS_DF;
	struct kvm_sregs s;

	pyvt_ops->get_sregs(vcpu, &s);
	di = vcpu->gprs[PYVT_RDI] & amask;
	la = seg_base(&s, 0) + di;
	if (!long_mode_code(&s))
		la = (u32)la;
	if (pyvt_write_guest_linear(vcpu, &s, la, data, p->count * p->size)) {
		u8 insn[MAX_INSN_LEN] = {};

		emulation_failed(vcpu, la, insn, 0);
		return 0;
	}
	set_reg_addr(&vcpu->gprs[PYVT_RDI],
		     df ? di - p->count * p->size : di + p->count * p->size,
		     p->addr_size);
	count = vcpu->gprs[PYVT_RCX] & amask;
	if (p->rep)
		set_reg_addr(&vcpu->gprs[PYVT_RCX], count - p->count,
			     p->addr_size);
	if (!p->rep || count == p->count)
		vcpu->rip = p->next_rip;
	return 1;
}

/*
 * Finish the instruction the last exit to user space left open.  Returns
 * 1 to go on into the guest, 0 if an exit was reported instead.
 */
int pyvt_complete_pending(struct pyvt_vcpu *vcpu)
{
	struct pyvt_pending_op *p = &vcpu->pending;
	enum pyvt_pending kind = p->kind;
	u64 val = 0;

	p->kind = PYVT_PENDING_NONE;
	/* User space moved rIP: the instruction is abandoned, as in KVM. */
	if (kind == PYVT_PENDING_NONE || vcpu->rip != p->rip)
		return 1;

	switch (kind) {
	case PYVT_PENDING_PIO_IN:
		memcpy(&val, page_address(vcpu->run_pages[1]), p->size);
		set_reg_sized(&vcpu->gprs[PYVT_RAX], val, p->size, false);
		vcpu->rip = p->next_rip;
		return 1;
	case PYVT_PENDING_PIO_OUT:
		vcpu->rip = p->next_rip;
		return 1;
	case PYVT_PENDING_INS:
		return complete_ins(vcpu);
	case PYVT_PENDING_MMIO_READ:
		memcpy(&val, vcpu->run->mmio.data, p->size);
		if (p->ext && p->size < 8)
			val = sign_extend64(val, p->size * 8 - 1);
		set_reg_sized(&vcpu->gprs[p->reg], val, p->dst_size,
			      p->high_byte);
		vcpu->rip = p->next_rip;
		return 1;
	default:
		return 1;
	}
}

struct mov_insn {
	int len;
	bool write;
	int size;		/* bytes accessed in memory */
	int dst_size;		/* register width for reads */
	int reg;
	bool high_byte;
	bool sign_extend;
	bool has_imm;
	u64 imm;
};

/* Length of ModRM + SIB + displacement at @p for this address size. */
static int modrm_len(const u8 *p, int addr_size)
{
	int mod = p[0] >> 6, rm = p[0] & 7, len = 1;

	if (mod == 3)
		return len;
	if (addr_size == 2) {
		if (mod == 0 && rm == 6)
			return len + 2;
		return len + (mod == 1 ? 1 : mod == 2 ? 2 : 0);
	}
	if (rm == 4) {
		len++;			/* SIB */
		if (mod == 0 && (p[1] & 7) == 5)
			return len + 4;
	}
	if (mod == 0 && rm == 5)
		return len + 4;		/* disp32 or RIP-relative */
	return len + (mod == 1 ? 1 : mod == 2 ? 4 : 0);
}

static int decode_mov(const struct kvm_sregs *s, const u8 *insn, int avail,
		      struct mov_insn *m)
{
	bool lm = long_mode_code(s), def32 = lm || s->cs.db;
	int op_size = def32 ? 4 : 2, addr_size = lm ? 8 : (def32 ? 4 : 2);
	int i = 0, rex = 0, op, ml, imm_len = 0;

	for (; i < avail; i++) {
		u8 b = insn[i];

		if (b == 0x66)
			op_size = def32 ? 2 : 4;
		else if (b == 0x67)
			addr_size = lm ? 4 : (addr_size == 4 ? 2 : 4);
		else if (b == 0x26 || b == 0x2e || b == 0x36 || b == 0x3e ||
			 b == 0x64 || b == 0x65 || b == 0xf0)
			continue;
		else
			break;
	}
	if (lm && i < avail && (insn[i] & 0xf0) == 0x40)
		rex = insn[i++];
	if (rex & 8)
		op_size = 8;
	if (i >= avail)
		return -EINVAL;

	memset(m, 0, sizeof(*m));
	op = insn[i++];
	if (op == 0x0f) {
		if (i >= avail)
			return -EINVAL;
		op = 0x0f00 | insn[i++];
	}

	switch (op) {
	case 0x88: case 0x89: case 0x8a: case 0x8b:
		m->write = op <= 0x89;
		m->size = (op & 1) ? op_size : 1;
		break;
	case 0xc6: case 0xc7:
		m->write = true;
		m->size = (op & 1) ? op_size : 1;
		m->has_imm = true;
		imm_len = min(m->size, 4);
		break;
	case 0xa0: case 0xa1: case 0xa2: case 0xa3:
		m->write = op >= 0xa2;
		m->size = (op & 1) ? op_size : 1;
		m->reg = PYVT_RAX;
		m->dst_size = m->size;
		m->len = i + addr_size;
		return m->len <= avail ? 0 : -EINVAL;
	case 0x0fb6: case 0x0fb7: case 0x0fbe: case 0x0fbf:
		m->size = (op & 1) ? 2 : 1;
		m->sign_extend = op >= 0x0fbe;
		break;
	default:
		return -EINVAL;
	}

	if (i >= avail)
		return -EINVAL;
	if (op == 0xc6 || op == 0xc7) {
		if ((insn[i] >> 3) & 7)	/* only /0 is MOV */
			return -EINVAL;
	} else {
		m->reg = ((insn[i] >> 3) & 7) | ((rex & 4) ? 8 : 0);
		/* Byte registers 4-7 are AH..BH unless a REX is present. */
		if (m->size == 1 && !rex && m->reg >= 4 && op < 0x0f00) {
			m->reg -= 4;
			m->high_byte = true;
		}
	}
	if ((insn[i] >> 6) == 3)	/* register operand: not memory */
		return -EINVAL;
	ml = modrm_len(&insn[i], addr_size);
	i += ml;
	m->dst_size = op >= 0x0f00 ? op_size : m->size;
	if (m->has_imm) {
		if (i + imm_len > avail)
			return -EINVAL;
		memcpy(&m->imm, &insn[i], imm_len);
		if (imm_len == 4 && m->size == 8)
			m->imm = (u64)(s64)(s32)m->imm;
		i += imm_len;
	}
	m->len = i;
	return m->len <= avail ? 0 : -EINVAL;
}

int pyvt_emulate_mmio(struct pyvt_vcpu *vcpu, u64 gpa)
{
	struct pyvt_pending_op *p = &vcpu->pending;
	struct kvm_run *run = vcpu->run;
	u8 insn[MAX_INSN_LEN];
	struct kvm_sregs s;
	struct mov_insn m;
	u64 val;
	int n;

	pyvt_ops->get_sregs(vcpu, &s);
	n = fetch_insn(vcpu, &s, insn);
	if (!n || decode_mov(&s, insn, n, &m)) {
		emulation_failed(vcpu, gpa, insn, n);
		return 0;
	}

	run->exit_reason = KVM_EXIT_MMIO;
	run->mmio.phys_addr = gpa;
	run->mmio.len = m.size;
	run->mmio.is_write = m.write;
	memset(run->mmio.data, 0, sizeof(run->mmio.data));

	if (m.write) {
		if (m.has_imm)
			val = m.imm;
		else if (m.high_byte)
			val = vcpu->gprs[m.reg] >> 8;
		else
			val = vcpu->gprs[m.reg];
		memcpy(run->mmio.data, &val, m.size);
		vcpu->rip += m.len;
		return 0;
	}

	memset(p, 0, sizeof(*p));
	p->kind = PYVT_PENDING_MMIO_READ;
	p->rip = vcpu->rip;
	p->next_rip = vcpu->rip + m.len;
	p->size = m.size;
	p->dst_size = m.dst_size;
	p->reg = m.reg;
	p->high_byte = m.high_byte;
	p->ext = m.sign_extend;
	return 0;
}
