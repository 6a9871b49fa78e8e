"""The datapath: the BPF program's ABI, its build, loading and attaching it to devices,
the flow table it reads, and test runs of it."""
