# Declarations of the native core (csrc/) used by _native.pyx: only what the
# Cython layer touches.  The C headers are the source of truth: port numbers,
# port counts and keys reach Python only through these names (_native.pyx
# exports them), never as literals written again in pyvt/.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "<linux/kvm.h>" nogil:
    # Members of kvm_run's anonymous exit union; Cython only reads fields.
    cdef struct pvt_kvm_run_io "kvm_run_io_member":
        uint8_t direction
        uint8_t size
        uint16_t port
        uint32_t count
        uint64_t data_offset

    cdef struct pvt_kvm_run_mmio "kvm_run_mmio_member":
        uint64_t phys_addr
        uint8_t data[8]
        uint32_t len
        uint8_t is_write

    cdef struct pvt_kvm_run_msr "kvm_run_msr_member":
        uint8_t error
        uint32_t reason
        uint32_t index
        uint64_t data

    cdef struct kvm_regs:
        uint64_t rax
        uint64_t rip

    cdef struct kvm_sync_regs:
        kvm_regs regs

    cdef struct pvt_kvm_run_s "kvm_run_s_member":
        kvm_sync_regs regs

    cdef struct kvm_run:
        uint8_t immediate_exit
        uint32_t exit_reason
        uint64_t kvm_valid_regs
        pvt_kvm_run_io io
        pvt_kvm_run_mmio mmio
        pvt_kvm_run_msr msr
        pvt_kvm_run_s s

    int KVM_EXIT_IO_OUT
    int KVM_EXIT_X86_WRMSR
    int KVM_MSR_EXIT_REASON_INVAL
    int KVM_MSR_EXIT_REASON_UNKNOWN
    int KVM_MSR_EXIT_REASON_FILTER
    int KVM_SYNC_X86_REGS
    unsigned long KVM_GET_REGS


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)


cdef extern from "sink.h" nogil:
    size_t PVT_SINK_UNLIMITED
    size_t PVT_SINK_DEFAULT_LIMIT

    cdef struct pvt_sink:
        size_t limit

    int pvt_sink_init(pvt_sink *sink)
    void pvt_sink_destroy(pvt_sink *sink)
    int pvt_sink_set_stream(pvt_sink *sink, int fd)
    int pvt_sink_set_limit(pvt_sink *sink, size_t limit)
    size_t pvt_sink_copy(pvt_sink *sink, size_t offset, uint8_t *out, size_t cap)
    uint64_t pvt_sink_dropped(pvt_sink *sink)
    void pvt_sink_clear(pvt_sink *sink)
    int pvt_sink_replace(pvt_sink *sink, const uint8_t *data, size_t n)


cdef extern from "iobus.h" nogil:
    int PVT_NO_USER

    ctypedef int (*pvt_io_fn)(void *opaque, uint64_t offset, uint8_t *data,
                              uint32_t len, bint is_write, uint64_t *stop_code)

    cdef struct pvt_bus:
        pass

    int pvt_bus_register(pvt_bus *bus, uint64_t base, uint64_t len,
                         pvt_io_fn fn, void *opaque, int user_id)
    int pvt_bus_unregister(pvt_bus *bus, uint64_t base)


cdef extern from "lazy_coalesce.h" nogil:
    int PVT_COALESCE_ARMED
    int PVT_COALESCE_REGISTERED
    int PVT_COALESCE_OFF

    cdef struct pvt_lazy_coalesce:
        pass

    void pvt_lazy_coalesce_init(pvt_lazy_coalesce *lazy, int vm_fd, uint64_t port,
                                pvt_io_fn fn, void *opaque)
    void pvt_lazy_coalesce_destroy(pvt_lazy_coalesce *lazy)
    int pvt_lazy_coalesce_io(void *opaque, uint64_t offset, uint8_t *data,
                             uint32_t len, bint is_write, uint64_t *stop_code)
    int pvt_lazy_coalesce_disable(pvt_lazy_coalesce *lazy)
    int pvt_lazy_coalesce_state(pvt_lazy_coalesce *lazy)


cdef extern from "machine.h" nogil:
    cdef struct pvt_machine:
        pvt_bus pio
        pvt_bus mmio
        pvt_bus msr
        bint unclaimed_as_pc

    int pvt_machine_init(pvt_machine *machine)
    void pvt_machine_destroy(pvt_machine *machine)


cdef extern from "uart16550.h" nogil:
    int PVT_UART_DEFAULT_PORT
    int PVT_UART_PORT_COUNT
    int PVT_UART_DEFAULT_IRQ
    int PVT_UART_COM2_IRQ

    cdef struct pvt_uart:
        pvt_sink output

    cdef struct pvt_uart_state:
        pass

    int pvt_uart_init(pvt_uart *uart)
    void pvt_uart_save(pvt_uart *uart, pvt_uart_state *state)
    int pvt_uart_load_state(pvt_uart *uart, const pvt_uart_state *state, bint irqchip)
    void pvt_uart_destroy(pvt_uart *uart)
    int pvt_uart_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len,
                    bint is_write, uint64_t *stop_code)
    uint32_t pvt_uart_feed(pvt_uart *uart, const uint8_t *data, uint32_t n)
    void pvt_uart_connect_irq(pvt_uart *uart, int vm_fd, uint32_t gsi)
    int pvt_uart_irq_level(pvt_uart *uart)


cdef extern from "debug_exit.h" nogil:
    int PVT_DEBUG_EXIT_DEFAULT_PORT
    int PVT_DEBUG_EXIT_PORT_COUNT
    int PVT_GUEST_EXCEPTION_PORT
    int pvt_debug_exit_io(void *opaque, uint64_t offset, uint8_t *data,
                          uint32_t len, bint is_write, uint64_t *stop_code)


cdef extern from "debugcon.h" nogil:
    int PVT_DEBUGCON_DEFAULT_PORT
    int PVT_DEBUGCON_PORT_COUNT
    int pvt_debugcon_io(void *opaque, uint64_t offset, uint8_t *data,
                        uint32_t len, bint is_write, uint64_t *stop_code)


cdef extern from "kick.h" nogil:
    int pvt_kick_setup()
    int pvt_kick_signal()
    void pvt_kick_set_current(kvm_run *run)
    int pvt_kick_arm(uint64_t first_ns, uint64_t interval_ns)
    void pvt_kick_disarm()
    void pvt_kick_block_outside_run(bint block)
    void pvt_kick_hold()
    void pvt_kick_release()
    uint64_t pvt_now_ns()


cdef extern from "vcpu_loop.h" nogil:
    enum: PVT_EXIT_REASON_SLOTS

    enum pvt_stop:
        PVT_STOP_EXIT
        PVT_STOP_USER_IO
        PVT_STOP_USER_MMIO
        PVT_STOP_DEVICE
        PVT_STOP_INTERRUPTED
        PVT_STOP_BAD_EXIT
        PVT_STOP_USER_MSR

    cdef struct pvt_stop_info:
        int user_id
        uint64_t stop_code
        uint64_t device_port

    enum pvt_pending_io:
        PVT_PENDING_NONE
        PVT_PENDING_READ
        PVT_PENDING_WRITE

    cdef struct pvt_vcpu:
        int fd
        kvm_run *run
        void *ring
        uint64_t kvm_exits
        uint64_t native_exits
        uint64_t coalesced
        uint64_t exits_by_reason[PVT_EXIT_REASON_SLOTS]
        uint64_t guest_ns
        pvt_pending_io pending_io
        bint kick_masked

    void pvt_vcpu_init(pvt_vcpu *vcpu, int fd, kvm_run *run, size_t run_size,
                       pvt_machine *machine, void *ring_page, long page_size)
    bint pvt_vcpu_io_data_valid(const pvt_vcpu *vcpu)
    void pvt_vcpu_destroy(pvt_vcpu *vcpu)
    int pvt_vcpu_run(pvt_vcpu *vcpu, pvt_stop_info *info)
    void pvt_vcpu_drain_coalesced(pvt_vcpu *vcpu)


cdef extern from "io_completion.h" nogil:
    int pvt_vcpu_finish_io(pvt_vcpu *vcpu)
    int pvt_vcpu_abandon_io(pvt_vcpu *vcpu)


# -- PC platform devices (issue 3) -------------------------------------------

cdef extern from "fw_cfg.h" nogil:
    int PVT_FW_CFG_PORT
    int PVT_FW_CFG_PORT_COUNT
    int PVT_FW_CFG_SIGNATURE
    int PVT_FW_CFG_ID
    int PVT_FW_CFG_RAM_SIZE
    int PVT_FW_CFG_NB_CPUS
    int PVT_FW_CFG_MAX_CPUS
    int PVT_FW_CFG_FILE_DIR
    int PVT_FW_CFG_FILE_FIRST
    int PVT_FW_CFG_KEY_COUNT
    int PVT_FW_CFG_NAME_SIZE

    cdef struct pvt_fw_cfg:
        pass

    int pvt_fw_cfg_init(pvt_fw_cfg *fw)
    void pvt_fw_cfg_destroy(pvt_fw_cfg *fw)
    int pvt_fw_cfg_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len,
                      bint is_write, uint64_t *stop_code)
    int pvt_fw_cfg_set(pvt_fw_cfg *fw, uint16_t key, const uint8_t *data, uint32_t len)
    int pvt_fw_cfg_set_u16(pvt_fw_cfg *fw, uint16_t key, uint16_t value)
    int pvt_fw_cfg_set_u64(pvt_fw_cfg *fw, uint16_t key, uint64_t value)
    int pvt_fw_cfg_add_file(pvt_fw_cfg *fw, const char *name, const uint8_t *data,
                            uint32_t len)
    long long pvt_fw_cfg_get(pvt_fw_cfg *fw, uint16_t key, uint8_t *out, uint32_t cap)
    void pvt_fw_cfg_get_position(pvt_fw_cfg *fw, uint16_t *selector, uint32_t *offset)
    void pvt_fw_cfg_set_position(pvt_fw_cfg *fw, uint16_t selector, uint32_t offset)


cdef extern from "cmos.h" nogil:
    int PVT_CMOS_PORT
    int PVT_CMOS_PORT_COUNT
    int PVT_CMOS_SIZE

    cdef struct pvt_cmos:
        pass

    cdef struct pvt_cmos_state:
        pass

    void pvt_cmos_save(pvt_cmos *cmos, pvt_cmos_state *state)
    void pvt_cmos_load(pvt_cmos *cmos, const pvt_cmos_state *state)

    int pvt_cmos_init(pvt_cmos *cmos)
    void pvt_cmos_destroy(pvt_cmos *cmos)
    int pvt_cmos_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len,
                    bint is_write, uint64_t *stop_code)
    void pvt_cmos_set_memory(pvt_cmos *cmos, uint64_t below_4g, uint64_t above_4g)
    uint8_t pvt_cmos_read(pvt_cmos *cmos, uint8_t index)
    void pvt_cmos_write(pvt_cmos *cmos, uint8_t index, uint8_t value)


cdef extern from "pm_timer.h" nogil:
    int PVT_PM_TIMER_PORT
    int PVT_PM_TIMER_PORT_COUNT
    unsigned long long PVT_PM_TIMER_HZ

    cdef struct pvt_pm_timer:
        pass

    int pvt_pm_timer_init(pvt_pm_timer *timer)
    int pvt_pm_timer_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len,
                        bint is_write, uint64_t *stop_code)
    uint32_t pvt_pm_timer_value(pvt_pm_timer *timer)


cdef extern from "i8042.h" nogil:
    int PVT_I8042_DATA_PORT
    int PVT_I8042_COMMAND_PORT
    int PVT_I8042_PORT_COUNT
    int PVT_I8042_CMD_PULSE_RESET
    int PVT_I8042_STOP_RESET

    cdef struct pvt_i8042:
        uint8_t command_byte

    cdef struct pvt_i8042_state:
        pass

    void pvt_i8042_save(pvt_i8042 *kbc, pvt_i8042_state *state)
    void pvt_i8042_load(pvt_i8042 *kbc, const pvt_i8042_state *state)

    int pvt_i8042_init(pvt_i8042 *kbc)
    void pvt_i8042_destroy(pvt_i8042 *kbc)
    int pvt_i8042_data_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len,
                          bint is_write, uint64_t *stop_code)
    int pvt_i8042_command_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len,
                             bint is_write, uint64_t *stop_code)


cdef extern from "acpi_pm1.h" nogil:
    int PVT_PM1_PORT
    int PVT_PM1_PORT_COUNT
    int PVT_PM1_EVENT_LENGTH
    int PVT_PM1_CONTROL_LENGTH
    int PVT_PM1_SLP_TYP_S5
    int PVT_PM1_SLP_TYP_S3
    int PVT_PM1_STOP_POWEROFF
    int PVT_PM1_STOP_SUSPEND
    int PVT_PM1_STS_WAK
    int PVT_PM1_STS_RTC
    int PVT_PM1_EN_RTC

    cdef struct pvt_acpi_pm1:
        uint16_t status
        uint16_t enable
        uint16_t control

    int pvt_acpi_pm1_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len,
                        bint is_write, uint64_t *stop_code)


cdef extern from "port80.h" nogil:
    int PVT_PORT80_PORT
    int PVT_PORT80_PORT_COUNT

    cdef struct pvt_port80:
        uint8_t last
        uint64_t writes

    int pvt_port80_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len,
                      bint is_write, uint64_t *stop_code)


cdef extern from "dirty_ring.h" nogil:
    int KVM_EXIT_DIRTY_RING_FULL

    uint32_t pvt_dirty_ring_collect(void *ring, uint32_t entries, uint32_t *fetch,
                                    uint32_t *slots, uint64_t *offsets, uint32_t max)
    uint32_t pvt_dirty_ring_recover(void *ring, uint32_t entries, uint32_t fetch,
                                    uint8_t *dirty, uint32_t *slots, uint64_t *offsets,
                                    uint32_t *advance, int *all_dirty)
    void pvt_dirty_ring_mark_harvested(void *ring, uint32_t entries, uint32_t first,
                                       uint32_t count)


# -- fast restores (session 6, "fast"): a vCPU state's writes in one call ---

cdef extern from "state_writes.h" nogil:
    cdef struct kvm_vcpu_events:
        pass

    cdef struct kvm_sregs:
        pass

    cdef struct pvt_user_mode_state:
        const kvm_regs *regs
        unsigned long sregs_request
        const void *sregs
        size_t sregs_common
        const void *xsave
        const void *fpu
        const kvm_vcpu_events *events

    int pvt_restore_user_mode(int fd, kvm_run *run, const pvt_user_mode_state *state,
                              int synced, int *writes, const char **failed)

    cdef struct pvt_state_write:
        unsigned long request
        const void *arg
        int expect

    int pvt_state_write_batch(int fd, const pvt_state_write *writes, int n, int *error)

cdef extern from "page_restore.h" nogil:
    int PVT_PAGE_RESTORE_PAGE_SIZE
    int pvt_restore_logged_pages(int vm_fd, uint32_t slot, uint64_t pages, uint8_t *target,
                                 const uint8_t *image, const uint64_t *data,
                                 const uint64_t *also, uint64_t *logged)


# -- pyvt.Sandbox's native call path (session 7) ------------------------------

cdef extern from "sandbox_call.h" nogil:
    cdef struct pvt_sandbox_entry:
        const kvm_regs *regs
        uint64_t stub
        uint64_t rsp

    void pvt_sandbox_enter(kvm_run *run, const pvt_sandbox_entry *entry, uint64_t function,
                           const uint64_t *args)

    cdef struct pvt_sandbox_reset_plan:
        int vm_fd
        uint32_t slot
        uint64_t pages
        uint8_t *target
        const uint8_t *image
        const uint64_t *data
        const uint64_t *reserved
        uint64_t *also
        uint64_t *written
        pvt_user_mode_state state

    int PVT_SANDBOX_RESET_DONE
    int PVT_SANDBOX_RESET_MEMORY
    int pvt_sandbox_reset(int vcpu_fd, kvm_run *run, pvt_sandbox_reset_plan *reset, int *writes,
                          const char **failed)
