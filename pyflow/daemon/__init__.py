"""pyflowd: configuration, the managed devices, the control socket, metrics and the
process around them (systemd readiness, watchdog, signals). It wires the other packages
together and holds no offload logic of its own.

main (the process), config (the file), devices (the wanted device list), operations (what
a request does), views (the JSON answers), stats (the snapshot behind ``stats`` and
/metrics), metrics (the Prometheus collector), api (the control socket)."""

from pyflow.daemon.footprint import skip_pyroute2_init

skip_pyroute2_init()  # before any daemon module imports pyroute2: see footprint.py
