# Shared helpers for the resources/ scripts. Source it; do not run it.
#
# Conventions: ROOT is the repository, BUILD the git-ignored build tree, DEBS the cache of
# downloaded .deb files, EXTRACT the cache of unpacked packages (one directory per package).

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RES="$ROOT/resources"
BUILD="${BUILD_DIR:-$ROOT/build}"
DEBS="$BUILD/debs"
EXTRACT="$BUILD/extract"

# shellcheck source=versions
. "$RES/versions"

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Quiet mode (resources/run.sh's default, RUN_QUIET=1): the output of package installs, builds
# and QEMU goes to logs in $LOGS instead of the terminal. RUN_LOGS names the directory.
LOGS="${RUN_LOGS:-$BUILD/run}"

# quietly NAME CMD...: runs CMD; in quiet mode its output is appended to $LOGS/NAME.log, and a
# failure shows the log's last lines and where it is.
quietly() {
    local name=$1; shift
    if [ "${RUN_QUIET:-0}" != 1 ]; then "$@"; return; fi
    mkdir -p "$LOGS"
    if ! "$@" >>"$LOGS/$name.log" 2>&1; then
        log "failed: $*; the end of $LOGS/$name.log:"
        tail -n 30 "$LOGS/$name.log" >&2
        return 1
    fi
}

# need_cmd CMD PACKAGE...: install the Debian packages when CMD is missing.
need_cmd() {
    local cmd=$1; shift
    command -v "$cmd" >/dev/null 2>&1 && return 0
    apt_install "$@"
}

apt_install() {
    log "installing missing packages: $*"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    if [ -z "${_APT_UPDATED:-}" ]; then
        quietly apt $sudo apt-get update -qq || true
        _APT_UPDATED=1
    fi
    quietly apt $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "$@" >&2
}

# fresh OUT IN...: true when OUT exists and is newer than every IN (files or directories).
fresh() {
    local out=$1; shift
    [ -e "$out" ] || return 1
    local in
    for in in "$@"; do
        [ -e "$in" ] || return 1
        if [ -d "$in" ]; then
            [ -z "$(find "$in" -newer "$out" -print -quit)" ] || return 1
        else
            [ "$out" -nt "$in" ] || return 1
        fi
    done
}

# fetch_deb PKG VERSION: prints the path of the downloaded .deb (cached in $DEBS).
fetch_deb() {
    local pkg=$1 ver=$2 f
    mkdir -p "$DEBS"
    f=$(find "$DEBS" -maxdepth 1 -name "${pkg}_*.deb" | while read -r d; do
        [ "$(dpkg-deb -f "$d" Version)" = "$ver" ] && echo "$d"; done | head -n1)
    if [ -z "$f" ]; then
        log "downloading $pkg=$ver"
        ( cd "$DEBS" && apt-get download -q "$pkg=$ver" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 ) || true
        f=$(find "$DEBS" -maxdepth 1 -name "${pkg}_*.deb" | while read -r d; do
            [ "$(dpkg-deb -f "$d" Version)" = "$ver" ] && echo "$d"; done | head -n1)
        if [ -z "$f" ]; then
            apt-get update -qq >&2 || true
            ( cd "$DEBS" && apt-get download -q "$pkg=$ver" >&2 ) ||
                die "cannot download $pkg=$ver (pinned in resources/versions); see 'apt-cache policy $pkg'"
            f=$(find "$DEBS" -maxdepth 1 -name "${pkg}_*.deb" | head -n1)
        fi
    fi
    echo "$f"
}

# unpack_deb DEB: unpacks into $EXTRACT/<name-version>/ once; prints that directory.
unpack_deb() {
    local deb=$1 dir
    dir="$EXTRACT/$(basename "$deb" .deb)"
    if ! fresh "$dir/.done" "$deb"; then
        rm -rf "$dir"; mkdir -p "$dir"
        dpkg-deb -x "$deb" "$dir"
        touch "$dir/.done"
    fi
    echo "$dir"
}

kernel_tree() { unpack_deb "$(fetch_deb "$KERNEL_PKG" "$KERNEL_VERSION")"; }
busybox_tree() { unpack_deb "$(fetch_deb "$BUSYBOX_PKG" "$BUSYBOX_VERSION")"; }

# modinfo_field FILE FIELD: a field of a module's .modinfo (.ko or .ko.xz), without kmod.
modinfo_field() {
    local f=$1 field=$2
    case "$f" in
        *.xz) xz -dc "$f" ;;
        *.zst) zstd -dc "$f" ;;
        *) cat "$f" ;;
    esac | tr '\0' '\n' | sed -n "s/^$field=//p" | head -n1
}

# module_order KTREE MODULE...: prints "name path" lines, dependencies first, each module once.
# The order comes from each module's depends= field (Debian's package has no modules.dep).
# Modules built into the kernel (=y in its config) have no file and are skipped.
module_order() {
    local ktree=$1; shift
    local moddir
    moddir=$(echo "$ktree"/lib/modules/*)
    declare -A path=() seen=()
    local f n
    while read -r f; do
        n=$(basename "$f"); n=${n%%.ko*}; n=${n//-/_}
        path[$n]=$f
    done < <(find "$moddir/kernel" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst')
    _visit() {
        local m=${1//-/_} d
        [ -n "${seen[$m]:-}" ] && return 0
        seen[$m]=1
        if [ -z "${path[$m]:-}" ]; then
            log "module $m: no file (built in?), skipped"
            return 0
        fi
        for d in $(modinfo_field "${path[$m]}" depends | tr ',' ' '); do _visit "$d"; done
        echo "$m ${path[$m]}"
    }
    for n in "$@"; do _visit "$n"; done
}

# kernel_config KTREE SYMBOL: y, m or empty.
kernel_config() {
    sed -n "s/^CONFIG_$2=//p" "$1"/boot/config-* | head -n1
}

# extract_vmlinux BZIMAGE OUT: the ELF kernel inside a bzImage. The setup header gives the
# payload's offset (0x248) and length (0x24c) relative to the protected-mode code, which starts
# after (setup_sects (0x1f1) + 1) 512-byte sectors. Debian's payload is an xz stream (x86 BCJ +
# LZMA2) followed by the 4-byte uncompressed size, hence --single-stream.
extract_vmlinux() {
    local bz=$1 out=$2 setup_sects pm off len
    setup_sects=$(od -An -t u1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')
    [ "$setup_sects" = 0 ] && setup_sects=4
    pm=$(( (setup_sects + 1) * 512 ))
    off=$(od -An -t u4 -j $((0x248)) -N4 "$bz" | tr -d ' ')
    len=$(od -An -t u4 -j $((0x24c)) -N4 "$bz" | tr -d ' ')
    [ "$(dd if="$bz" bs=1 skip=$((pm + off)) count=6 status=none | od -An -t x1 | tr -d ' ')" = "fd377a585a00" ] ||
        die "$bz: payload at $((pm + off)) is not xz; only xz-compressed kernels are supported"
    dd if="$bz" bs=64K iflag=skip_bytes,count_bytes skip=$((pm + off)) count="$len" status=none |
        xz -dc --single-stream > "$out.tmp"
    [ "$(head -c4 "$out.tmp" | od -An -t x1 | tr -d ' ')" = "7f454c46" ] || die "$bz: payload is not an ELF file"
    mv "$out.tmp" "$out"
}

# write_cpio_node NAME MODE MAJOR MINOR: a newc archive holding one device node plus the
# trailer, so the image gets /dev/console without mknod (which needs root). The kernel unpacks
# concatenated archives in order.
write_cpio_node() {
    local name=$1 mode=$2 maj=$3 min=$4
    _hdr() { # ino mode nlink filesize rmaj rmin namesize name
        printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%s\0' \
            "$1" "$2" 0 0 "$3" 0 "$4" 0 0 "$5" "$6" "$7" 0 "$8"
        local n=$(( (110 + $7) % 4 ))
        [ $n = 0 ] || head -c $((4 - n)) /dev/zero
    }
    _hdr 1 $((0040755)) 2 0 0 0 4 "dev"
    _hdr 2 "$mode" 1 0 "$maj" "$min" $((${#name} + 1)) "$name"
    _hdr 0 0 1 0 0 0 11 "TRAILER!!!"
}

# pack_initramfs DIR OUT: gzip'd newc archive of DIR (owned by root:root) plus /dev/console.
pack_initramfs() {
    local dir=$1 out=$2
    need_cmd cpio cpio
    {
        (cd "$dir" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet)
        write_cpio_node dev/console $((0020600)) 5 1
    } | gzip -6 -n > "$out.tmp"
    mv "$out.tmp" "$out"
}

# install_busybox TREE DIR: busybox and one symlink per applet in DIR/bin.
install_busybox() {
    local bb=$1/bin/busybox dir=$2 a
    mkdir -p "$dir/bin" "$dir/sbin"
    cp "$bb" "$dir/bin/busybox"
    for a in $("$bb" --list); do
        [ -e "$dir/bin/$a" ] || ln -s busybox "$dir/bin/$a"
    done
}
