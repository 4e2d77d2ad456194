#!/usr/bin/env bash
# Sanity check of the test-bed host kernel: boot it under QEMU TCG with nested SVM and a
# busybox-only initramfs, check that kvm_amd gave it a /dev/kvm, and report the timing.
#
#   kernel-config/smoke-testbed.sh        (builds the kernel first if needed)
#
# Exits 0 and prints "smoke: ok ..." when /dev/kvm appeared in the test bed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUSYBOX=${BUSYBOX:-/bin/busybox}
for tool in qemu-system-x86_64 cpio; do
	command -v "$tool" >/dev/null || {
		echo "smoke: $tool not found; run 'cargo xtask setup' as root" >&2
		exit 1
	}
done
[[ -x $BUSYBOX ]] || {
	echo "smoke: $BUSYBOX not found; install busybox-static" >&2
	exit 1
}

KERNEL_DIR=$("$HERE/build.sh" testbed-host | tail -n 1)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

mkdir -p "$WORK/root"/{bin,dev,proc,sys}
cp "$BUSYBOX" "$WORK/root/bin/busybox"
cat >"$WORK/root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
echo "SMOKE: init at uptime $(cut -d' ' -f1 /proc/uptime) s, $(nproc) cpus, kernel $(uname -r)"
if [ -c /dev/kvm ]; then echo "SMOKE: /dev/kvm present"; else echo "SMOKE: /dev/kvm MISSING"; fi
dmesg | grep -i -m3 -E 'kvm|svm'
echo "SMOKE: done"
reboot -f
EOF
chmod +x "$WORK/root/init"
(cd "$WORK/root" && find . | cpio -o -H newc --quiet) >"$WORK/initramfs.cpio"

start=$(date +%s.%N)
# sockets=2: without ACPI the kernel finds CPUs in SeaBIOS's MP table, which lists one
# entry per package; with plain `-smp 2` (2 cores in 1 socket) the test bed sees 1 CPU.
timeout 300 qemu-system-x86_64 -accel tcg -cpu EPYC,+svm,+npt -m 2048 -smp 2,sockets=2,cores=1,threads=1 \
	-nographic -nodefaults -serial stdio -no-reboot \
	-kernel "$KERNEL_DIR/bzImage" -initrd "$WORK/initramfs.cpio" \
	-append "console=ttyS0 panic=-1 quiet reboot=t" </dev/null 2>"$WORK/qemu.err" | tee "$WORK/console.log"
end=$(date +%s.%N)
wall=$(echo "$end - $start" | bc)

if ! grep -q "SMOKE: init at .* 2 cpus" "$WORK/console.log"; then
	echo "smoke: FAILED: the test bed did not see 2 CPUs" >&2
	exit 1
elif grep -q "SMOKE: /dev/kvm present" "$WORK/console.log"; then
	echo "smoke: ok: test-bed host booted with 2 CPUs, /dev/kvm present; QEMU start to exit ${wall} s"
else
	echo "smoke: FAILED: no '/dev/kvm present' marker on the console (QEMU ran ${wall} s)" >&2
	exit 1
fi
