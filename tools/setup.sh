#!/usr/bin/env bash
# kvmtrace setup, run as root on a Debian/Ubuntu host. Idempotent: a second run checks,
# finds everything in place, and changes nothing.
#
#   tools/setup.sh          bcc, kernel headers for bcc, tracefs/debugfs, .venv with kvmtrace
#   tools/setup.sh --test   the same plus what the test suite uses (perf, tmux, objdump, cc,
#                           unshare, pytest, ruff, pyarrow)
#
# Everything it changes on the system is announced on a line starting with "setup: changed".
# It links /usr/local/bin/kvmtrace to .venv/bin/kvmtrace, so that `sudo kvmtrace ...` works
# (sudo's secure_path holds /usr/local/bin), unless another kvmtrace is there already.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
want_test=0
[[ ${1:-} == --test ]] && want_test=1
release=$(uname -r)
headers_tree=/var/lib/kvmtrace/kernel-headers/$release   # kvmtrace/host/headers.py agrees

say() { echo "setup: $*"; }
changed() { echo "setup: changed: $*"; }
die() { echo "setup: error: $*" >&2; exit 2; }

[[ $(id -u) == 0 ]] || die "run as root (sudo tools/setup.sh): it installs packages and mounts tracefs"
command -v apt-get >/dev/null || die "no apt-get: install bcc's Python bindings (python3-bpfcc or python3-bcc) and kernel headers by hand"

apt_updated=0
apt_install() {  # install the packages not yet installed
	local missing=()
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	((${#missing[@]})) || return 0
	if ((!apt_updated)); then apt-get update -qq; apt_updated=1; fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	changed "installed packages: ${missing[*]}"
}
apt_has() { # is a package known to apt?
	if ((!apt_updated)); then apt-get update -qq; apt_updated=1; fi
	apt-cache show "$1" >/dev/null 2>&1
}

# 1. bcc from the distribution (its Python bindings land in /usr/bin/python3's dist-packages).
apt_install python3-bpfcc python3-venv
if ((want_test)); then apt_install linux-perf tmux binutils gcc util-linux; fi

# 2. Kernel headers that bcc can compile against.
if [[ -e /lib/modules/$release/build/include ]]; then
	say "kernel headers: /lib/modules/$release/build"
elif [[ -e $headers_tree/include ]]; then
	say "kernel headers: $headers_tree (private fallback tree, BCC_KERNEL_SOURCE)"
elif apt_has "linux-headers-$release"; then
	apt_install "linux-headers-$release"
	say "kernel headers: linux-headers-$release"
else
	# No headers for this kernel in the distribution: overlay the distribution's generic
	# -common and -amd64 header packages into a private tree of symlinks. bcc builds
	# tracepoint programs from tracefs formats, so mismatched headers are safe for them.
	arch=$(dpkg --print-architecture)
	apt_install "linux-headers-$arch"
	common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
	flavour=$(ls -d /usr/src/linux-headers-*-"$arch" 2>/dev/null | sort -V | tail -n 1)
	[[ -n $common && -n $flavour ]] || die "linux-headers-$arch did not provide /usr/src/linux-headers-*-{common,$arch}"
	tmp=$headers_tree.tmp.$$
	rm -rf "$tmp"
	mkdir -p "$tmp"
	cp -rs "$common/." "$tmp/"
	cp -rsf "$flavour/." "$tmp/"
	mv -T "$tmp" "$headers_tree"
	changed "created $headers_tree (symlinks: $(basename "$common") overlaid with $(basename "$flavour")); no matching headers exist for $release, kvmtrace points bcc there with BCC_KERNEL_SOURCE"
fi

# 3. tracefs and debugfs.
if [[ ! -e /sys/kernel/tracing/events ]]; then
	mount -t tracefs nodev /sys/kernel/tracing
	changed "mounted tracefs on /sys/kernel/tracing (mount -t tracefs nodev /sys/kernel/tracing)"
fi
if ! mountpoint -q /sys/kernel/debug; then
	mount -t debugfs nodev /sys/kernel/debug
	changed "mounted debugfs on /sys/kernel/debug (mount -t debugfs nodev /sys/kernel/debug)"
fi

# 4. The Python environment: Debian's python (where bcc lives) with the project installed.
venv=$here/.venv
extras=""
((want_test)) && extras="[test]"
stamp=$venv/.kvmtrace-stamp
want_stamp="$(sha256sum "$here/pyproject.toml" | cut -c1-16)$extras"
if [[ ! -x $venv/bin/python ]]; then
	/usr/bin/python3 -m venv --system-site-packages "$venv"
	say "created $venv"
fi
if [[ ! -f $stamp ]] || ! grep -qxF -- "$want_stamp" "$stamp"; then
	"$venv/bin/pip" install -q --disable-pip-version-check -e "$here$extras"
	echo "$want_stamp" >"$stamp"
	say "installed kvmtrace$extras into $venv"
fi
"$venv/bin/python" -c "import bcc" 2>/dev/null || die "bcc does not import in $venv (python3-bpfcc installed?)"

# 5. kvmtrace on root's PATH as sudo sets it (secure_path holds /usr/local/bin).
# link_on_path TARGET LINK: make LINK a symlink to TARGET; leave any other LINK alone and say
# so, except a dangling link into another checkout's .venv (that checkout is gone).
link_on_path() {
	local target=$1 link=$2 old
	if [[ -L $link ]]; then
		old=$(readlink "$link")
		if [[ $old == "$target" ]]; then
			say "on PATH: $link -> $target"
			return 0
		fi
		if [[ -e $link || $old != */.venv/bin/kvmtrace ]]; then
			say "not linking $link: it exists and points to $old; run $target, or remove $link and run setup again"
			return 0
		fi
		ln -sfn "$target" "$link"
		changed "replaced $link (a dangling link to $old) with a link to $target"
		return 0
	fi
	if [[ -e $link ]]; then
		say "not linking $link: another file is there; run $target, or remove $link and run setup again"
		return 0
	fi
	mkdir -p "$(dirname "$link")"
	ln -s "$target" "$link"
	changed "linked $link -> $target (so sudo kvmtrace ... finds it)"
}
link_on_path "$venv/bin/kvmtrace" /usr/local/bin/kvmtrace
say "ready: kvmtrace ($venv/bin/kvmtrace)"
