"""Adapters: KVM ivshmem, DPDK, ConnectX (arrive with later issues)."""
