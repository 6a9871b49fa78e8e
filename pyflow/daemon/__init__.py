"""pyflowd: configuration, the managed devices, the control socket, metrics and the
process around them (systemd readiness, watchdog, signals). It wires the other packages
together and holds no offload logic of its own."""
