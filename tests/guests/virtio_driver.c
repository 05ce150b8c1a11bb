/* A minimal virtio 1.x PCI driver, freestanding, for tests/test_virtio_guest.py.
 *
 * It finds the virtio device the host asks for by enumerating bus 0 through
 * 0xcf8/0xcfc, locates the common/notify/ISR/device structures by their
 * vendor capabilities, negotiates features (VERSION_1 plus the device bits
 * the host asks for), sets up one split queue in guest memory, submits the
 * requests the host described (each one a chain, optionally through an
 * indirect table), notifies the queue and polls the used ring.  Everything
 * it sees goes to the result block; isa-debug-exit ends the run.
 * Runs in long mode at ring 3 (natively on PVM hosts; pyvt's page tables
 * map 0-4 GiB for ring 3 and its TSS lets port I/O through).
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define CMD_ADDRESS 0x7000UL
#define RESULT_ADDRESS 0x6000UL
#define DESC_ADDRESS 0x10000UL
#define AVAIL_ADDRESS 0x11000UL
#define USED_ADDRESS 0x12000UL
#define INDIRECT_ADDRESS 0x13000UL
#define MAX_REQUESTS 8
#define MAX_SEGMENTS 4
#define POLL_LIMIT 200000000UL

#define FLAG_INDIRECT 1      /* each request through an indirect table */
#define FLAG_RESET_AFTER 2   /* reset the device at the end (status 0) */
#define FLAG_MSIX 4          /* enable MSI-X, vector 0 (masked) for the queue */

struct segment { u64 addr; u32 len; u32 write; };
struct request { u32 nseg; u32 pad; struct segment seg[MAX_SEGMENTS]; };
struct command {
    u32 device_id, queue, nreq, flags;
    u64 features;                 /* device feature bits to accept if offered */
    u32 queue_size;               /* 0: the device's maximum */
    u32 pad;
    struct request req[MAX_REQUESTS];
};
struct result {
    u32 stage;                    /* how far it got (STAGE_*) */
    u32 slot;
    u64 offered, accepted;
    u32 status, queue_size, num_queues, isr;
    u32 used_id[MAX_REQUESTS], used_len[MAX_REQUESTS];
    u32 config_generation, notify_multiplier;
    u8 config[64];                /* the first bytes of the device configuration */
    u32 msix_vector;              /* the queue's vector, read back */
    u32 pba;                      /* the MSI-X pending bits after the requests */
};

enum { STAGE_START = 1, STAGE_FOUND, STAGE_CAPS, STAGE_FEATURES, STAGE_QUEUE,
       STAGE_RUNNING, STAGE_DONE, STAGE_TIMEOUT = 0x100, STAGE_NO_DEVICE, STAGE_NO_CAPS,
       STAGE_FEATURES_REFUSED, STAGE_NO_QUEUE };

static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port) : "memory"); }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port) : "memory"); }
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port) : "memory"); }
#define barrier() __asm__ volatile("" ::: "memory")
#define R8(a) (*(volatile u8 *)(a))
#define R16(a) (*(volatile u16 *)(a))
#define R32(a) (*(volatile u32 *)(a))

static u32 cfg_read(u32 slot, u32 offset)
{
    outl(0xcf8, 0x80000000u | slot << 11 | (offset & 0xfc));
    return inl(0xcfc) >> ((offset & 3) * 8);
}

static void cfg_write16(u32 slot, u32 offset, u16 value)
{
    outl(0xcf8, 0x80000000u | slot << 11 | (offset & 0xfc));
    outw(0xcfc + (offset & 2), value);
}

static u64 bar_address(u32 slot, u32 bar)
{
    u32 low = cfg_read(slot, 0x10 + 4 * bar);
    u64 address = low & ~0xfu;
    if ((low & 6) == 4)  /* 64-bit memory BAR */
        address |= (u64)cfg_read(slot, 0x14 + 4 * bar) << 32;
    return address;
}

static void finish(struct result *res, u32 stage)
{
    res->stage = stage;
    outb(0xf4, 0);  /* isa-debug-exit */
    for (;;)
        ;
}

void _start(void)
{
    struct command *cmd = (struct command *)CMD_ADDRESS;
    struct result *res = (struct result *)RESULT_ADDRESS;
    u64 common = 0, notify = 0, isr = 0, device = 0, pba = 0;
    u32 slot, multiplier = 0, i, j;

    res->stage = STAGE_START;
    for (slot = 0; slot < 32; slot++)
        if (cfg_read(slot, 0) == (0x1af4u | cmd->device_id << 16))
            break;
    if (slot == 32)
        finish(res, STAGE_NO_DEVICE);
    res->slot = slot;
    res->stage = STAGE_FOUND;

    /* The vendor capabilities: cfg_type at +3, bar at +4, offset at +8. */
    for (u32 cap = cfg_read(slot, 0x34) & 0xff; cap; cap = cfg_read(slot, cap + 1) & 0xff) {
        if ((cfg_read(slot, cap) & 0xff) == 0x11 && (cmd->flags & FLAG_MSIX)) {
            u32 where = cfg_read(slot, cap + 8);  /* PBA offset | BIR */
            pba = bar_address(slot, where & 7) + (where & ~7u);
            cfg_write16(slot, cap + 2, 0x8000);   /* MSI-X enable; every vector masked */
        }
        if ((cfg_read(slot, cap) & 0xff) != 0x09)
            continue;
        u32 type = cfg_read(slot, cap + 3) & 0xff;
        u64 where = bar_address(slot, cfg_read(slot, cap + 4) & 0xff) + cfg_read(slot, cap + 8);
        if (type == 1) common = where;
        else if (type == 2) { notify = where; multiplier = cfg_read(slot, cap + 16); }
        else if (type == 3) isr = where;
        else if (type == 4) device = where;
    }
    if (!common || !notify || !isr || !device)
        finish(res, STAGE_NO_CAPS);
    res->notify_multiplier = multiplier;
    res->stage = STAGE_CAPS;

    /* 3.1.1 Driver requirements: device initialization */
    R8(common + 20) = 0;                         /* reset */
    R8(common + 20) = 1 | 2;                     /* ACKNOWLEDGE | DRIVER */
    R32(common + 0) = 0;
    u64 offered = R32(common + 4);
    R32(common + 0) = 1;
    offered |= (u64)R32(common + 4) << 32;
    res->offered = offered;
    u64 accepted = offered & (cmd->features | 1UL << 32);
    res->accepted = accepted;
    R32(common + 8) = 0;
    R32(common + 12) = (u32)accepted;
    R32(common + 8) = 1;
    R32(common + 12) = (u32)(accepted >> 32);
    R8(common + 20) = 1 | 2 | 8;                 /* FEATURES_OK */
    res->status = R8(common + 20);
    if (!(res->status & 8))
        finish(res, STAGE_FEATURES_REFUSED);
    res->stage = STAGE_FEATURES;

    res->num_queues = R16(common + 18);
    R16(common + 22) = cmd->queue;
    u32 size = R16(common + 24);
    if (!size)
        finish(res, STAGE_NO_QUEUE);
    if (cmd->queue_size && cmd->queue_size < size)
        size = cmd->queue_size;
    R16(common + 24) = size;
    res->queue_size = size;
    u32 notify_off = R16(common + 30);
    /* Fresh rings, as a driver allocates them: an earlier run's avail index
     * must not offer its chains again. */
    for (volatile u64 *p = (volatile u64 *)DESC_ADDRESS; p < (volatile u64 *)(INDIRECT_ADDRESS + 0x1000); p++)
        *p = 0;
    R32(common + 32) = DESC_ADDRESS; R32(common + 36) = 0;
    R32(common + 40) = AVAIL_ADDRESS; R32(common + 44) = 0;
    R32(common + 48) = USED_ADDRESS; R32(common + 52) = 0;
    if (cmd->flags & FLAG_MSIX)
        R16(common + 26) = 0;                    /* queue_msix_vector */
    res->msix_vector = R16(common + 26);
    R16(common + 28) = 1;                        /* queue_enable */
    res->stage = STAGE_QUEUE;
    R8(common + 20) = 1 | 2 | 8 | 4;             /* DRIVER_OK */
    res->status = R8(common + 20);
    res->config_generation = R8(common + 21);
    for (i = 0; i < sizeof(res->config); i++)
        res->config[i] = R8(device + i);
    res->stage = STAGE_RUNNING;

    /* The requests: descriptors 0.., one chain each (or one indirect each). */
    volatile u64 *desc = (volatile u64 *)DESC_ADDRESS;
    volatile u16 *avail = (volatile u16 *)AVAIL_ADDRESS;
    volatile u16 *used = (volatile u16 *)USED_ADDRESS;
    u32 next = 0;
    for (i = 0; i < cmd->nreq; i++) {
        struct request *rq = &cmd->req[i];
        volatile u64 *table = desc;
        u32 first = next;
        if (cmd->flags & FLAG_INDIRECT) {
            table = (volatile u64 *)(INDIRECT_ADDRESS + i * 16 * MAX_SEGMENTS);
            first = 0;
        }
        for (j = 0; j < rq->nseg; j++) {
            u32 index = first + j;
            u16 flags = (j + 1 < rq->nseg ? 1 : 0) | (rq->seg[j].write ? 2 : 0);
            table[2 * index] = rq->seg[j].addr;
            table[2 * index + 1] = rq->seg[j].len | (u64)flags << 32 | (u64)(index + 1) << 48;
        }
        u32 head = next;
        if (cmd->flags & FLAG_INDIRECT) {
            desc[2 * next] = (u64)table;
            desc[2 * next + 1] = (16 * rq->nseg) | (u64)4 << 32;
            next += 1;
        } else {
            next += rq->nseg;
        }
        avail[2 + i % size] = head;
        barrier();
        avail[1] = i + 1;
        barrier();
        R16(notify + notify_off * multiplier) = cmd->queue;
        u64 n;
        for (n = 0; n < POLL_LIMIT && used[1] != (u16)(i + 1); n++)
            __asm__ volatile("pause");
        if (n == POLL_LIMIT)
            finish(res, STAGE_TIMEOUT + i);
        barrier();
        volatile u32 *elem = (volatile u32 *)(USED_ADDRESS + 4 + 8 * (i % size));
        res->used_id[i] = elem[0];
        res->used_len[i] = elem[1];
    }
    res->isr = R8(isr);
    if (pba)
        res->pba = R32(pba);
    res->status = R8(common + 20);
    if (cmd->flags & FLAG_RESET_AFTER) {
        R8(common + 20) = 0;
        res->status = R8(common + 20);
    }
    finish(res, STAGE_DONE);
}
