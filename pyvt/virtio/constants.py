"""The numbers of the virtio 1.x specification (OASIS virtio v1.2) that
pyvt's virtio devices use, named as the specification names them."""

# 2.1 Device status field
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# 6 Reserved feature bits
F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_VERSION_1 = 32

# 2.7.5 The virtqueue descriptor table
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# 2.7.6 / 2.7.8 suppression flags
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# 5 Device types
TYPE_NET = 1
TYPE_BLOCK = 2
TYPE_CONSOLE = 3
TYPE_ENTROPY = 4

# 4.1.2 PCI device discovery
PCI_VENDOR_ID = 0x1AF4
PCI_DEVICE_ID_BASE = 0x1040   # + device type, for modern (non-transitional) devices
PCI_SUBSYSTEM_ID = 0x1100     # the subsystem id QEMU gives its virtio devices
PCI_REVISION = 1              # non-transitional devices: revision 1 or higher

# 4.1.4 Virtio structure PCI capabilities
PCI_CAP_VENDOR = 0x09
PCI_CAP_COMMON_CFG = 1
PCI_CAP_NOTIFY_CFG = 2
PCI_CAP_ISR_CFG = 3
PCI_CAP_DEVICE_CFG = 4

# 4.1.4.3 struct virtio_pci_common_cfg: offsets
COMMON_DFSELECT = 0
COMMON_DF = 4
COMMON_GFSELECT = 8
COMMON_GF = 12
COMMON_MSIX = 16
COMMON_NUMQ = 18
COMMON_STATUS = 20
COMMON_CFGGENERATION = 21
COMMON_Q_SELECT = 22
COMMON_Q_SIZE = 24
COMMON_Q_MSIX = 26
COMMON_Q_ENABLE = 28
COMMON_Q_NOFF = 30
COMMON_Q_DESCLO = 32
COMMON_Q_DESCHI = 36
COMMON_Q_AVAILLO = 40
COMMON_Q_AVAILHI = 44
COMMON_Q_USEDLO = 48
COMMON_Q_USEDHI = 52
COMMON_CFG_SIZE = 56

# 4.1.4.5 ISR status bits
ISR_QUEUE = 1
ISR_CONFIG = 2

# 4.1.5.1.2 MSI-X vector "none"
NO_VECTOR = 0xFFFF

# 4.1.2: the class code pyvt gives each device type (QEMU's choices),
# and "unassigned" for a user's Python device type.
PCI_CLASS = {
    TYPE_NET: 0x020000,      # network, ethernet
    TYPE_BLOCK: 0x010000,    # mass storage, SCSI (as QEMU and Linux expect)
    TYPE_CONSOLE: 0x078000,  # communication, other
    TYPE_ENTROPY: 0x00FF00,  # unclassified, other
}
PCI_CLASS_OTHER = 0xFF0000

# 5.2 Block device
BLK_F_SIZE_MAX = 1
BLK_F_SEG_MAX = 2
BLK_F_RO = 5
BLK_F_BLK_SIZE = 6
BLK_F_FLUSH = 9
BLK_T_IN = 0
BLK_T_OUT = 1
BLK_T_FLUSH = 4
BLK_T_GET_ID = 8
BLK_S_OK = 0
BLK_S_IOERR = 1
BLK_S_UNSUPP = 2
BLK_ID_BYTES = 20
SECTOR_SIZE = 512

# 5.1 Network device
NET_F_CSUM = 0
NET_F_GUEST_CSUM = 1
NET_F_MAC = 5
NET_F_STATUS = 16
NET_S_LINK_UP = 1
NET_HDR_SIZE = 12   # struct virtio_net_hdr with num_buffers (VERSION_1)

# 5.3 Console device
CONSOLE_F_SIZE = 0
