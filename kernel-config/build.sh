#!/usr/bin/env bash
# Build one of kiln's kernels from Debian's linux-source-6.12 and cache the result.
#
#   kernel-config/build.sh guest          the CI guest kernel (guest.config)
#   kernel-config/build.sh testbed-host   the nested test-bed host (guest.config + testbed-host.config)
#
# Output: ${KILN_CACHE_DIR:-$HOME/.cache/kiln}/kernels/NAME-<hash>/{vmlinux,bzImage,config}
# where <hash> covers the fragment(s), this script and the linux-source package version.
# The LAST line of stdout is that directory; all progress goes to stderr. A second call
# with nothing changed prints the directory at once. Safe to call concurrently (flock).
# Set KILN_KERNEL_VERBOSE=1 to stream the full make output to stderr.
set -euo pipefail
# Everything runs from main() at the end: bash reads a script while running it, so this
# keeps a running build safe from edits to this file.

SRC_PKG=linux-source-6.12
SRC_TARBALL=/usr/src/$SRC_PKG.tar.xz
PACKAGES=($SRC_PKG bc flex bison libelf-dev libssl-dev make gcc xz-utils lz4)

log() { printf 'kernel-config: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

usage() {
	echo "usage: $0 guest|testbed-host" >&2
	exit 2
}

# --- Packages -------------------------------------------------------------------------
pkg_installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]; }

ensure_packages() {
	local missing=() p
	for p in "${PACKAGES[@]}"; do
		pkg_installed "$p" || missing+=("$p")
	done
	[[ ${#missing[@]} -eq 0 ]] && return 0
	if [[ $(id -u) -ne 0 ]]; then
		die "missing packages: ${missing[*]}; install them (sudo apt-get install ${missing[*]}) or run as root"
	fi
	log "installing ${missing[*]}"
	# apt/dpkg have their own lock; wait for it rather than fail if another install runs.
	apt-get -o DPkg::Lock::Timeout=600 update -qq >&2
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
		--no-install-recommends "${missing[@]}" >&2
}

# --- Cache key ------------------------------------------------------------------------
cache_key() {
	local version
	version=$(dpkg-query -W -f='${Version}' "$SRC_PKG" 2>/dev/null || true)
	[[ -n $version ]] || return 1
	{
		printf '%s %s\n' "$SRC_PKG" "$version"
		cat "${FRAGMENTS[@]}"
		printf '%s\n' "$SELF_SUM"
	} | sha256sum | cut -c1-16
}

is_complete() { [[ -f $1/.complete && -s $1/vmlinux && -s $1/bzImage && -s $1/config ]]; }

main() {
	[[ $# -eq 1 ]] || usage
	NAME=$1
	HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
	SELF_SUM=$(sha256sum <"$HERE/$(basename "${BASH_SOURCE[0]}")")
	case "$NAME" in
	guest) FRAGMENTS=("$HERE/guest.config") ;;
	testbed-host) FRAGMENTS=("$HERE/guest.config" "$HERE/testbed-host.config") ;;
	*) usage ;;
	esac
	for f in "${FRAGMENTS[@]}"; do
		[[ -r $f ]] || die "config fragment $f is missing"
	done

	CACHE=${KILN_CACHE_DIR:-$HOME/.cache/kiln}/kernels
	mkdir -p "$CACHE"

	# Fast path: already built, nothing to install.
	if KEY=$(cache_key) && is_complete "$CACHE/$NAME-$KEY"; then
		log "$NAME kernel is cached"
		echo "$CACHE/$NAME-$KEY"
		exit 0
	fi

	exec 9>"$CACHE/.lock-$NAME"
	log "taking the $NAME build lock" && flock 9
	ensure_packages

	# Snapshot the fragments under the lock: merge, check and cache key all use this copy, so
	# editing a fragment while a build runs cannot mix two versions in one result.
	BUILD="$CACHE/build/$NAME"
	mkdir -p "$BUILD"
	rm -rf "$BUILD/fragments"
	mkdir "$BUILD/fragments"
	cp "${FRAGMENTS[@]}" "$BUILD/fragments/"
	SNAPSHOT=()
	for f in "${FRAGMENTS[@]}"; do
		SNAPSHOT+=("$BUILD/fragments/$(basename "$f")")
	done
	FRAGMENTS=("${SNAPSHOT[@]}")
	KEY=$(cache_key) || die "$SRC_PKG is not installed"
	OUT="$CACHE/$NAME-$KEY"
	if is_complete "$OUT"; then # built by whoever held the lock before us
		log "$NAME kernel is cached"
		echo "$OUT"
		exit 0
	fi

	# --- Clean source tree, extracted once --------------------------------------------------
	SRC_VERSION=$(dpkg-query -W -f='${Version}' "$SRC_PKG")
	SRC="$CACHE/src/$SRC_PKG-$SRC_VERSION"
	mkdir -p "$CACHE/src"
	(
		flock 8
		if [[ ! -f $SRC/.extracted ]]; then
			[[ -r $SRC_TARBALL ]] || die "$SRC_TARBALL not found although $SRC_PKG is installed"
			log "extracting $SRC_TARBALL (once) into $SRC"
			tmp=$(mktemp -d "$CACHE/src/.extract.XXXXXX")
			tar -C "$tmp" -xf "$SRC_TARBALL"
			rm -rf "$SRC"
			mv "$tmp/$SRC_PKG" "$SRC"
			rmdir "$tmp"
			touch "$SRC/.extracted"
		fi
	) 8>"$CACHE/.lock-src" || exit 1

	# --- Configure ------------------------------------------------------------------------
	# One build tree per kernel ($BUILD), reused across config changes: rebuilds are incremental.
	LOG="$BUILD/build.log"
	: >"$LOG"
	JOBS=$(nproc)

	run_make() {
		if [[ ${KILN_KERNEL_VERBOSE:-0} == 1 ]]; then
			make -C "$SRC" O="$BUILD" "$@" 2>&1 | tee -a "$LOG" >&2
		else
			make -C "$SRC" O="$BUILD" "$@" >>"$LOG" 2>&1
		fi || {
			tail -n 60 "$LOG" >&2
			die "make $* failed for the $NAME kernel; full log: $LOG"
		}
	}

	START=$SECONDS
	log "configuring $NAME: tinyconfig + $(basename -a "${FRAGMENTS[@]}" | tr '\n' ' ')"
	run_make tinyconfig
	(cd "$BUILD" && "$SRC/scripts/kconfig/merge_config.sh" -m -O "$BUILD" "$BUILD/.config" "${FRAGMENTS[@]}") >>"$LOG" 2>&1 ||
		die "merge_config.sh failed; see $LOG"
	run_make olddefconfig

	# --- Verify: every line of the fragments must hold (later fragments win) -----------------
	# Collect the wanted value of each symbol, then compare with the final .config. A symbol
	# whose dependencies are not met is silently dropped by Kconfig; here it fails the build.
	declare -A WANT=()
	for f in "${FRAGMENTS[@]}"; do
		while IFS= read -r line; do
			if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
				WANT[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
			elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
				WANT[${BASH_REMATCH[1]}]=n
			fi
		done <"$f"
	done
	declare -A HAVE=()
	while IFS= read -r line; do
		if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
			HAVE[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
		fi
	done <"$BUILD/.config"
	BAD=()
	for sym in $(printf '%s\n' "${!WANT[@]}" | sort); do
		want=${WANT[$sym]}
		have=${HAVE[$sym]:-n}
		[[ $want == "$have" ]] || BAD+=("$sym: wanted $want, got $have")
	done
	if [[ ${#BAD[@]} -gt 0 ]]; then
		log "the final .config of the $NAME kernel does not hold these fragment lines:"
		printf '  %s\n' "${BAD[@]}" >&2
		die "fix their dependencies in kernel-config/*.config (see 'Depends on' in make O=$BUILD menuconfig, or the Kconfig files under $SRC)"
	fi
	log "config verified: ${#WANT[@]} fragment lines hold"

	# --- Build ----------------------------------------------------------------------------
	log "building vmlinux and bzImage with -j$JOBS (log: $LOG)"
	run_make -j"$JOBS" vmlinux bzImage

	TMP_OUT=$(mktemp -d "$CACHE/.$NAME-$KEY.XXXXXX")
	cp "$BUILD/vmlinux" "$TMP_OUT/vmlinux"
	cp "$BUILD/arch/x86/boot/bzImage" "$TMP_OUT/bzImage"
	cp "$BUILD/.config" "$TMP_OUT/config"
	touch "$TMP_OUT/.complete"
	rm -rf "$OUT"
	mv "$TMP_OUT" "$OUT"
	log "$NAME kernel built in $((SECONDS - START)) s: $OUT"
	echo "$OUT"
}

main "$@"
