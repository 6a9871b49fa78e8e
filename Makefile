# pyflow — one-command setup, test, lint, bench.
# `make setup` is idempotent: it installs what is missing and fails naming what it could not get.

SHELL := /bin/bash

# `make`: the native module and the prebuilt datapath object (the build step of `make setup`)
all: native
PY_SYS := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
KVER := $(shell uname -r)
APT_PACKAGES := clang llvm libbpf-dev libmnl-dev bpftool python3-bpfcc python3-venv iproute2 nftables conntrack \
	ethtool socat iperf3 tcpdump iputils-ping gcc make systemd curl linux-perf
PYTEST_ARGS ?=

.PHONY: all setup apt headers bpffs venv native datapath lab-setup test test-host lab lab-parity lint bench demo clean

setup: apt headers bpffs venv native lab-setup
	@$(PY) -c 'import bcc, pyroute2, prometheus_client, pyflow._native' \
		|| { echo "setup: the virtualenv cannot import bcc/pyroute2/prometheus_client/pyflow._native" >&2; exit 1; }
	@echo "setup: done"

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "setup: installing$$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q >/dev/null || { echo "setup: apt-get update failed" >&2; exit 1; }; \
		apt-get install -y -q $$missing >/dev/null || { echo "setup: apt-get install failed for:$$missing" >&2; exit 1; }; \
	fi

# bcc compiles at load time against kernel headers. Where the running kernel ships none,
# Debian's headers are linked in: the datapath uses only UAPI headers, so the version gap is harmless.
headers:
	@if [ -e /lib/modules/$(KVER)/build/include ]; then exit 0; fi; \
	if ! ls -d /usr/src/linux-headers-*-amd64 >/dev/null 2>&1; then \
		echo "setup: no headers for $(KVER); installing linux-headers-amd64"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q linux-headers-amd64 >/dev/null \
			|| { echo "setup: cannot install linux-headers-amd64 (bcc needs kernel headers)" >&2; exit 1; }; \
	fi; \
	hdr=$$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -1); common=$${hdr%-amd64}-common; \
	[ -d "$$common" ] || { echo "setup: $$common missing (bcc needs it)" >&2; exit 1; }; \
	mkdir -p /lib/modules/$(KVER); ln -sfn $$hdr /lib/modules/$(KVER)/build; ln -sfn $$common /lib/modules/$(KVER)/source; \
	echo "setup: linked $$hdr as headers for $(KVER)"

bpffs:
	@grep -q ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf \
		|| { echo "setup: cannot mount bpffs at /sys/fs/bpf" >&2; exit 1; }

# --system-site-packages: bcc's Python module comes from Debian (python3-bpfcc).
venv:
	@[ -x $(PY) ] || $(PY_SYS) -m venv --system-site-packages $(VENV) \
		|| { echo "setup: cannot create $(VENV)" >&2; exit 1; }
	@$(PY) -m pip install -q --upgrade pip setuptools wheel cffi >/dev/null
	@$(PY) -m pip install -q "pyroute2>=0.9" "prometheus-client>=0.17" "pytest>=7" "scapy>=2.5" ruff mypy matplotlib numpy \
		|| { echo "setup: pip install failed" >&2; exit 1; }

# pip's editable build runs setup.py, which also compiles the datapath object when its
# sources changed (csrc/build_bpf.py); `make datapath` rebuilds only the object.
native:
	@$(PY) -m pip install -q --no-build-isolation -e . \
		|| { echo "setup: building pyflow (cffi extension from csrc/, BPF object from ebpf/) failed" >&2; exit 1; }

BPF_OBJ := pyflow/datapath/pyflow_xdp.bpf.o
datapath: $(BPF_OBJ)
$(BPF_OBJ): ebpf/pyflow_xdp.c $(wildcard ebpf/lib/*.h ebpf/include/*.h) csrc/build_bpf.py
	@$(PY_SYS) csrc/build_bpf.py $@ >/dev/null

# The README's test command: the host suite, then the kernel lab (in this order, also under -j).
test:
	$(PY) -m pytest -q -p no:cacheprovider tests $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory lab

test-host:
	$(PY) -m pytest -q -p no:cacheprovider tests $(PYTEST_ARGS)

# Kernel lab (tests/lab/): Debian's stock kernel under qemu for what this kernel lacks
# (cls_flower, nf flowtable, 802.1Q, PPP). --no-install-recommends and tiny-initramfs keep the
# image from pulling udev/systemd upgrades into the machine; the image is only ever booted by
# qemu (no bootloader is touched: none is installed). bcc inside the lab needs the headers of
# exactly the lab kernel, so those are installed by version.
LAB_APT := qemu-system-x86 busybox-static linux-image-amd64 tiny-initramfs ppp
LAB_ARGS ?=
lab-setup: venv
	@missing=""; for p in $(LAB_APT); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "setup: installing$$missing (kernel lab)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q >/dev/null || { echo "setup: apt-get update failed" >&2; exit 1; }; \
		apt-get install -y -q --no-install-recommends $$missing >/dev/null \
			|| { echo "setup: apt-get install failed for:$$missing (kernel lab)" >&2; exit 1; }; \
	fi; \
	kver=$$(dpkg-query -W -f='$${Depends}' linux-image-amd64 | grep -o 'linux-image-[0-9][^ ,]*' | head -1); \
	kver=$${kver#linux-image-}; [ -n "$$kver" ] || { echo "setup: cannot tell the lab kernel's version" >&2; exit 1; }; \
	[ -f /boot/vmlinuz-$$kver ] || { echo "setup: /boot/vmlinuz-$$kver missing (kernel lab)" >&2; exit 1; }; \
	if [ ! -e /lib/modules/$$kver/build/include ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends linux-headers-$$kver >/dev/null \
			|| { echo "setup: cannot install linux-headers-$$kver (bcc in the kernel lab needs it)" >&2; exit 1; }; \
	fi
	@$(PY) -m pip install -q "virtme-ng>=1.30" || { echo "setup: pip install virtme-ng failed (kernel lab)" >&2; exit 1; }

lab:
	$(PY) tests/lab/run.py -- $(LAB_ARGS)

# The nf flowtable and pyflow side by side, on the control-plane topology
# (bench-results/lab-parity.{json,md}) and on the OpenWrt-shaped router
# (bench-results/lab-openwrt.{json,md}); about 20 min under emulation, so not part of
# `make lab` / `make test` (which runs a short OpenWrt subset).
lab-parity:
	PYFLOW_LAB_FULL=1 $(PY) tests/lab/run.py --timeout 3300 -- tests/lab/guest/test_flowtable_parity.py \
		tests/lab/guest/test_openwrt.py tests/lab/guest/test_pppoe_gso.py tests/lab/guest/test_sqm.py

lint:
	$(VENV)/bin/ruff check pyflow tests
	$(VENV)/bin/mypy pyflow

bench:
	$(PY) tests/bench/run_all.py

# pyflowd in a namespace router, real traffic, flows/stats/metrics printed; removes all it made
demo:
	$(PY) -m tests.demo.demo

clean:
	rm -rf build *.egg-info pyflow/_native*.so $(BPF_OBJ) bench-results .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
