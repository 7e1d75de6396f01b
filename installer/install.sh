#!/bin/sh
# shellcheck shell=sh
#
# runos installer: downloads one release of the runos node agent, verifies it, installs it side
# by side with earlier versions, writes the systemd unit, registers the node and starts the agent.
#
#   curl -fsSL https://github.com/runos-dev/runos/releases/download/vX.Y.Z/install.sh \
#     | sudo sh -s -- --version vX.Y.Z --server cp.example.com --token-file /root/token
#
# POSIX sh (no bashisms); `shellcheck -s sh` clean. Everything runs inside main(), called on the
# last line, so a truncated download runs nothing, and every command it starts reads /dev/null:
# when the script itself arrives on standard input, no command may eat the rest of it.
#
# Usage, flags, exit codes, what is verified and what is not: docs/install.md, or --help.
# The enrolment token is never read by this script, never on any command line, never printed:
# `runos register` reads it from the file named by --token-file.

set -eu

PROG=runos-install

# Exit codes (docs/install.md). Stable: scripts may rely on them.
EX_OK=0          # installed (and registered, and started or told how to start)
EX_FAIL=1        # anything not covered below (a write failed, an unexpected tool error)
EX_USAGE=2       # invalid command line: unknown flag, malformed value, missing --version...
EX_PLATFORM=3    # this machine is not supported: not Linux, unknown CPU, not root, no curl
EX_DOWNLOAD=4    # a release file could not be downloaded
EX_VERIFY=5      # verification failed: checksum, --sha256 pin, checksums.txt, binary version
EX_REGISTER=6    # `runos register` failed (its own message and exit code are shown)
EX_START=7       # systemctl failed to enable or start the service

# Largest files accepted from the release.
MAX_BINARY_BYTES=268435456   # 256 MiB
MAX_CHECKSUMS_BYTES=65536

usage() {
	cat <<'EOF'
runos installer: install, verify, register and start the runos node agent.

Usage (as root):
  curl -fsSL <base>/download/vX.Y.Z/install.sh | sh -s -- --version vX.Y.Z \
      --server HOST[:PORT] --token-file FILE [options]

Required:
  --version vX.Y.Z      the release to install (exactly vMAJOR.MINOR.PATCH)

Registration (needed unless the node is already registered):
  --server HOST[:PORT]  control plane host name or IP; PORT is the enrolment (L1Sec) port,
                        default 9191; an IPv6 address with a port is written [addr]:port
  --token-file FILE     file holding the one-time enrolment token (mode 0600); the token is
                        never put on a command line or printed
  --ca-file FILE        the control plane's CA certificate (its ca.pem); optional: without
                        it, the CA the server presents is used if it matches the token's pin
  --ca-sha256 HEX       pin of that CA (sha256 of its DER); the token normally carries it
  --l2-port PORT        the control plane's L2Sec port, when not 9192
  --force-register      enrol again although the node is registered (a new node identity)

Verification and source:
  --sha256 HEX          expected sha256 of the agent binary (the console's install command
                        includes it); refused when the download does not match
  --base URL            release base URL (https only); default
                        https://github.com/$RUNOS_REPO/releases, RUNOS_REPO=runos-dev/runos

Other:
  --no-start            install and register, but do not enable or start the service
  --help                show this help

Environment:
  RUNOS_REPO            owner/name of the GitHub repository (default runos-dev/runos)
  CURL_CA_BUNDLE        CA bundle curl trusts (e.g. a private mirror's CA)
  RUNOS_INSTALL_ROOT    tests only: a prefix for every path written (see docs/install.md)

Exit codes:
  0  success
  1  failure not covered below
  2  usage error (invalid command line)
  3  unsupported machine: not Linux, unknown CPU architecture, not root, curl missing
  4  a release file could not be downloaded
  5  verification failed (checksums.txt, --sha256, or the binary's version); nothing changed
  6  runos register failed (its message and exit code are shown)
  7  systemctl could not enable or start the service
EOF
}

say() {
	printf '%s: %s\n' "$PROG" "$*" >&2
}

# die CODE MESSAGE: print `runos-install: error: MESSAGE` and exit with CODE.
die() {
	_code=$1
	shift
	printf '%s: error: %s\n' "$PROG" "$*" >&2
	exit "$_code"
}

# --- validation helpers (pure) ----------------------------------------------------------------

# is_semver_tag S: exactly vMAJOR.MINOR.PATCH, no leading zeros, nothing else.
is_semver_tag() {
	[ "${#1}" -le 40 ] && matches "$1" 'v(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)'
}

# norm_sha256 S: prints S as 64 lowercase hex digits (an optional `sha256:` prefix dropped), or
# fails.
norm_sha256() {
	_h=$(printf '%s' "$1" | tr 'A-F' 'a-f')
	_h=${_h#sha256:}
	case $_h in
	'' | *[!0-9a-f]*) return 1 ;;
	esac
	[ "${#_h}" -eq 64 ] || return 1
	printf '%s\n' "$_h"
}

nl='
'

# matches S ERE: S is one line and matches the extended regular expression ERE as a whole.
matches() {
	case $1 in
	*"$nl"*) return 1 ;;
	esac
	printf '%s\n' "$1" | grep -Eqx -- "$2"
}

# is_port S: a decimal port 1..65535.
is_port() {
	case $1 in
	'' | *[!0-9]*) return 1 ;;
	esac
	[ "${#1}" -le 5 ] && [ "$1" -ge 1 ] && [ "$1" -le 65535 ]
}

# --- tools --------------------------------------------------------------------------------------

# sha256_of FILE: prints the file's sha256 (64 lowercase hex digits).
sha256_of() {
	if command -v sha256sum >/dev/null 2>&1; then
		_sum=$(sha256sum "$1" </dev/null) || return 1
	else
		_sum=$(openssl dgst -sha256 -r "$1" </dev/null) || return 1
	fi
	norm_sha256 "${_sum%% *}"
}

# fetch URL DEST MAXBYTES: https only (also after redirects), TLS 1.2+, bounded in time and size.
fetch() {
	curl --proto '=https' --proto-redir '=https' --tlsv1.2 -fsSL \
		--connect-timeout 20 --max-time 600 --retry 3 --retry-delay 2 \
		--max-filesize "$3" -o "$2" "$1" </dev/null
}

# runos_version BIN: prints the version the binary reports (`runos version --json`).
runos_version() {
	_out=$("$1" version --json </dev/null 2>/dev/null) || return 1
	printf '%s\n' "$_out" | sed -n 's/.*"agentVersion" *: *"\([^"]*\)".*/\1/p'
}

# --- cleanup ------------------------------------------------------------------------------------

tmp=
staging=
staged_files=

# Called from the EXIT trap only.
# shellcheck disable=SC2317
cleanup() {
	if [ -n "$staged_files" ]; then
		for _f in $staged_files; do
			rm -f "$_f"
		done
	fi
	if [ -n "$staging" ]; then
		rm -rf "$staging"
	fi
	if [ -n "$tmp" ]; then
		rm -rf "$tmp"
	fi
}

# stage PATH: remember a temporary file in an install directory, removed if we stop early.
stage() {
	staged_files="$staged_files $1"
}

# put SRC DEST MODE: replace DEST atomically with a copy of SRC (temp name in DEST's directory,
# then rename, which is atomic on one file system).
put() {
	_new="$(dirname "$2")/.$(basename "$2").new.$$"
	stage "$_new"
	(umask 077 && cp "$1" "$_new") || return 1
	chmod "$3" "$_new" || return 1
	if [ "$is_root" = 1 ]; then
		chown 0:0 "$_new" || return 1
	fi
	mv -f "$_new" "$2" || return 1
}

# --- main ---------------------------------------------------------------------------------------

main() {
	umask 022

	version=
	server=
	token_file=
	ca_file=
	ca_sha256=
	l2_port=
	pin=
	base=
	no_start=0
	force_register=0

	while [ $# -gt 0 ]; do
		case $1 in
		--help | -h)
			usage
			exit "$EX_OK"
			;;
		--no-start)
			no_start=1
			shift
			continue
			;;
		--force-register)
			force_register=1
			shift
			continue
			;;
		--token | --token=*)
			die "$EX_USAGE" "the token is never given on the command line: write it to a file (mode 0600) and pass --token-file FILE"
			;;
		--version=* | --server=* | --token-file=* | --ca-file=* | --ca-sha256=* | --l2-port=* | --sha256=* | --base=*)
			_flag=${1%%=*}
			_val=${1#*=}
			shift
			;;
		--version | --server | --token-file | --ca-file | --ca-sha256 | --l2-port | --sha256 | --base)
			[ $# -ge 2 ] || die "$EX_USAGE" "$1 needs a value (see --help)"
			_flag=$1
			_val=$2
			shift 2
			;;
		--*)
			# The name only: a mistyped flag's value could be a secret.
			die "$EX_USAGE" "unknown flag ${1%%=*} (see --help)"
			;;
		*)
			die "$EX_USAGE" "unexpected argument (not shown; it could be a secret): every value follows its flag (see --help)"
			;;
		esac
		[ -n "$_val" ] || die "$EX_USAGE" "$_flag needs a value (see --help)"
		case $_flag in
		--version) version=$_val ;;
		--server) server=$_val ;;
		--token-file) token_file=$_val ;;
		--ca-file) ca_file=$_val ;;
		--ca-sha256) ca_sha256=$_val ;;
		--l2-port) l2_port=$_val ;;
		--sha256) pin=$_val ;;
		--base) base=$_val ;;
		esac
	done

	# --- check the command line before touching anything ---------------------------------------
	[ -n "$version" ] || die "$EX_USAGE" "--version vX.Y.Z is required (the release to install; see --help)"
	is_semver_tag "$version" ||
		die "$EX_USAGE" "--version must be exactly vMAJOR.MINOR.PATCH (e.g. v1.2.3), got something else; see the releases page for the versions that exist"

	if [ -n "$pin" ]; then
		pin=$(norm_sha256 "$pin") || die "$EX_USAGE" "--sha256 must be 64 hex digits (the sha256 of the agent binary)"
	fi
	if [ -n "$ca_sha256" ]; then
		ca_sha256=$(norm_sha256 "$ca_sha256") || die "$EX_USAGE" "--ca-sha256 must be 64 hex digits (the caSha256 that \`runos-controlplane token create\` prints)"
	fi
	if [ -n "$l2_port" ]; then
		is_port "$l2_port" || die "$EX_USAGE" "--l2-port must be a port number between 1 and 65535"
	fi

	# --server HOST[:PORT] -> host, l1_port. A bare IPv6 address has several colons and no port.
	host=
	l1_port=
	if [ -n "$server" ]; then
		matches "$server" '[][A-Za-z0-9.:_-]+' ||
			die "$EX_USAGE" "--server must be HOST or HOST:PORT (a host name or an IP address)"
		case $server in
		\[*\]:*)
			host=${server%%]:*}
			host=${host#\[}
			l1_port=${server##*]:}
			;;
		\[*\])
			host=${server#\[}
			host=${host%]}
			;;
		*:*:*) host=$server ;;
		*:*)
			host=${server%:*}
			l1_port=${server##*:}
			;;
		*) host=$server ;;
		esac
		[ -n "$host" ] || die "$EX_USAGE" "--server needs a host name or IP address"
		if [ -n "$l1_port" ]; then
			is_port "$l1_port" || die "$EX_USAGE" "--server HOST:PORT needs a port number between 1 and 65535"
		fi
	fi
	if [ -n "$server" ] && [ -z "$token_file" ]; then
		die "$EX_USAGE" "--server needs --token-file FILE (the enrolment token from \`runos-controlplane token create\`)"
	fi
	if [ -n "$token_file" ] && [ -z "$server" ]; then
		die "$EX_USAGE" "--token-file needs --server HOST (the control plane to register with)"
	fi
	if [ -n "$token_file" ]; then
		{ [ -f "$token_file" ] && [ -r "$token_file" ]; } ||
			die "$EX_USAGE" "cannot read the token file $token_file: check the path (the token is read from a file, never from the command line)"
	fi
	if [ -n "$ca_file" ]; then
		{ [ -f "$ca_file" ] && [ -r "$ca_file" ]; } ||
			die "$EX_USAGE" "cannot read the CA file $ca_file: copy the control plane's ca.pem to this node and pass its path"
	fi

	repo=${RUNOS_REPO:-runos-dev/runos}
	matches "$repo" '[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+' || die "$EX_USAGE" "RUNOS_REPO must be OWNER/NAME"
	[ -n "$base" ] || base="https://github.com/$repo/releases"
	matches "$base" "https://[][A-Za-z0-9._~:/?#@!\$&'()*+,;=%-]+" ||
		die "$EX_USAGE" "--base must be an https:// URL"
	while [ "${base%/}" != "$base" ]; do
		base=${base%/}
	done

	# Tests only: every path written goes under this prefix (DESTDIR-style).
	root=${RUNOS_INSTALL_ROOT:-}
	if [ -n "$root" ]; then
		matches "$root" '/[A-Za-z0-9._/-]*' ||
			die "$EX_USAGE" "RUNOS_INSTALL_ROOT must be an absolute path of letters, digits and . _ / -"
		root=${root%/}
	fi

	# --- the machine ----------------------------------------------------------------------------
	os=$(uname -s) || die "$EX_PLATFORM" "uname failed"
	[ "$os" = Linux ] || die "$EX_PLATFORM" "runos runs on Linux only (this is $os)"
	machine=$(uname -m) || die "$EX_PLATFORM" "uname failed"
	case $machine in
	x86_64 | amd64) arch=amd64 ;;
	aarch64 | arm64) arch=arm64 ;;
	*) die "$EX_PLATFORM" "no runos release for the CPU architecture $machine (releases exist for x86_64 and aarch64)" ;;
	esac
	is_root=0
	if [ "$(id -u)" = 0 ]; then
		is_root=1
	fi
	if [ -z "$root" ] && [ "$is_root" != 1 ]; then
		die "$EX_PLATFORM" "run the installer as root: curl -fsSL ... | sudo sh -s -- ..."
	fi
	command -v curl >/dev/null 2>&1 || die "$EX_PLATFORM" "curl is needed: install it (e.g. apt-get install curl) and run again"
	if ! command -v sha256sum >/dev/null 2>&1 && ! command -v openssl >/dev/null 2>&1; then
		die "$EX_PLATFORM" "sha256sum (coreutils) or openssl is needed to verify the download"
	fi

	asset="nodeagent-linux-$arch"
	bindir="$root/usr/local/bin"
	link="$bindir/runos"
	libdir="$root/usr/local/lib/runos"
	vdir="$libdir/$version"
	vbin="$vdir/runos"
	etcdir="$root/etc/runos"
	config="$etcdir/config.toml"
	unitdir="$root/etc/systemd/system"
	unit="$unitdir/runos.service"

	# How the agent is started: the default config path unless the paths are prefixed.
	if [ -n "$root" ]; then
		agent_cmd="$link --config $config agent"
	else
		agent_cmd="$link agent"
	fi

	# Fail fast: registering needs --server and --token-file, so without them there must be an
	# installed agent that does not say "not registered" (exit 3). A damaged one may say nothing
	# useful: the new binary decides below.
	if [ -z "$token_file" ]; then
		_rc=0
		if [ -e "$link" ]; then
			"$link" --config "$config" certificate status --json </dev/null >/dev/null 2>&1 || _rc=$?
		else
			_rc=3
		fi
		[ "$_rc" != 3 ] ||
			die "$EX_USAGE" "this node is not registered yet: pass --server HOST and --token-file FILE (create a token with \`runos-controlplane token create\`)"
	fi

	if [ -d "$link" ] && [ ! -L "$link" ]; then
		die "$EX_FAIL" "$link is a directory; move it away and run again"
	fi

	# --- download and verify --------------------------------------------------------------------
	tmp=$(mktemp -d "${TMPDIR:-/tmp}/runos-install.XXXXXXXX") || die "$EX_FAIL" "cannot create a temporary directory"
	url="$base/download/$version"

	say "downloading $url/checksums.txt"
	fetch "$url/checksums.txt" "$tmp/checksums.txt" "$MAX_CHECKSUMS_BYTES" ||
		die "$EX_DOWNLOAD" "cannot download $url/checksums.txt: check that $version exists, the network, and --base (curl trusts \$CURL_CA_BUNDLE)"

	# Exactly one line names the asset, and it is exactly `<64 hex>  <asset>`.
	entries=$(awk -v a="$asset" '{ n = $NF; sub(/^\*/, "", n); if (n == a) c++ } END { print c + 0 }' "$tmp/checksums.txt") ||
		die "$EX_VERIFY" "cannot read checksums.txt"
	[ "$entries" = 1 ] ||
		die "$EX_VERIFY" "checksums.txt of $version has $entries entries for $asset (expected exactly one): refusing to install; nothing was changed"
	line=$(grep -Ex "[0-9a-f]{64}  $asset" "$tmp/checksums.txt") ||
		die "$EX_VERIFY" "the checksums.txt entry for $asset is not in sha256sum format (<64 hex>  $asset): refusing to install; nothing was changed"
	expected=${line%% *}

	if [ -n "$pin" ] && [ "$pin" != "$expected" ]; then
		die "$EX_VERIFY" "--sha256 $pin does not match the release: checksums.txt of $version says $expected for $asset. Refusing to install; nothing was changed. Check the version and the pin (both come from the same install command), and report it if they do"
	fi

	# Re-run of an installed version: the binary in place is reused when it still matches.
	reuse=0
	if [ -f "$vbin" ] && [ ! -L "$vbin" ]; then
		have=$(sha256_of "$vbin") || have=
		if [ "$have" = "$expected" ]; then
			reuse=1
		else
			say "$vbin does not match the release (sha256 ${have:-unreadable}); replacing it"
		fi
	fi

	binary_changed=0
	if [ "$reuse" = 1 ]; then
		say "$version is already installed at $vbin (sha256 $expected)"
	else
		say "downloading $url/$asset"
		fetch "$url/$asset" "$tmp/$asset" "$MAX_BINARY_BYTES" ||
			die "$EX_DOWNLOAD" "cannot download $url/$asset: check the network and that $version has a release for $arch"
		got=$(sha256_of "$tmp/$asset") || die "$EX_FAIL" "cannot compute the sha256 of the download"
		[ "$got" = "$expected" ] ||
			die "$EX_VERIFY" "checksum mismatch for $asset: the download has sha256 $got, checksums.txt of $version says $expected. Refusing to install; nothing was changed. Try again later, and report it if it persists"
		if [ -n "$pin" ] && [ "$got" != "$pin" ]; then
			die "$EX_VERIFY" "checksum mismatch for $asset: the download has sha256 $got, --sha256 says $pin. Refusing to install; nothing was changed"
		fi
		say "verified sha256 $got (checksums.txt${pin:+ and --sha256})"

		# Stage in the install directory (often unlike /tmp, not mounted noexec), check that the
		# binary runs and is the version asked for, then move it into place.
		mkdir -p "$libdir" || die "$EX_FAIL" "cannot create $libdir"
		staging=$(mktemp -d "$libdir/.staging.XXXXXXXX") || die "$EX_FAIL" "cannot create a staging directory in $libdir"
		cp "$tmp/$asset" "$staging/runos" || die "$EX_FAIL" "cannot write $staging/runos"
		chmod 0755 "$staging/runos" || die "$EX_FAIL" "cannot chmod $staging/runos"
		reported=$(runos_version "$staging/runos") || reported=
		[ -n "$reported" ] ||
			die "$EX_VERIFY" "the downloaded binary does not run on this machine ($machine): refusing to install; nothing was changed"
		[ "v$reported" = "$version" ] ||
			die "$EX_VERIFY" "the binary of release $version reports version $reported: refusing to install; nothing was changed. Report it"
		mkdir -p "$vdir" || die "$EX_FAIL" "cannot create $vdir"
		chmod 0755 "$vdir" || die "$EX_FAIL" "cannot chmod $vdir"
		put "$staging/runos" "$vbin" 0755 || die "$EX_FAIL" "cannot install $vbin"
		rm -rf "$staging"
		staging=
		binary_changed=1
		say "installed $vbin"
	fi

	# Switch /usr/local/bin/runos to this version: a new symlink under a temporary name, renamed
	# over the old one (atomic: there is always a working `runos`).
	mkdir -p "$bindir" || die "$EX_FAIL" "cannot create $bindir"
	old_target=
	if [ -L "$link" ]; then
		old_target=$(readlink "$link" 2>/dev/null) || old_target=
	fi
	if [ "$old_target" != "$vbin" ]; then
		tmp_link="$bindir/.runos.link.$$"
		stage "$tmp_link"
		rm -f "$tmp_link"
		ln -s "$vbin" "$tmp_link" || die "$EX_FAIL" "cannot create a symlink in $bindir"
		mv -f "$tmp_link" "$link" || die "$EX_FAIL" "cannot point $link at $vbin"
		binary_changed=1
		if [ -n "$old_target" ]; then
			say "$link now points to $vbin (was $old_target)"
		else
			say "$link now points to $vbin"
		fi
	fi

	# --- configuration and unit -----------------------------------------------------------------
	mkdir -p "$etcdir" || die "$EX_FAIL" "cannot create $etcdir"
	if [ ! -e "$config" ]; then
		cat >"$tmp/config.toml" <<EOF
# runos agent configuration (docs/cli.md). Written once by the installer, which never changes
# an existing file; \`runos register\` fills in [server]. Reload with \`systemctl reload runos\`.

[paths]
key = "$etcdir/node.key"
certificate = "$etcdir/node.crt"
ca = "$etcdir/ca.pem"
l1_ca = "$etcdir/l1sec-ca.pem"
state_dir = "$root/var/lib/runos"
run_dir = "$root/run/runos"
EOF
		put "$tmp/config.toml" "$config" 0600 || die "$EX_FAIL" "cannot write $config"
		say "wrote $config"
	fi
	if [ ! -d "$root/var/lib/runos" ]; then
		mkdir -p "$root/var/lib/runos" || die "$EX_FAIL" "cannot create $root/var/lib/runos"
		chmod 0700 "$root/var/lib/runos" || die "$EX_FAIL" "cannot chmod $root/var/lib/runos"
	fi

	write_unit >"$tmp/runos.service" || die "$EX_FAIL" "cannot write the unit"
	unit_changed=0
	if [ ! -f "$unit" ] || ! cmp -s "$tmp/runos.service" "$unit"; then
		mkdir -p "$unitdir" || die "$EX_FAIL" "cannot create $unitdir"
		put "$tmp/runos.service" "$unit" 0644 || die "$EX_FAIL" "cannot write $unit"
		unit_changed=1
		say "wrote $unit"
	fi

	# --- registration ---------------------------------------------------------------------------
	registered=0
	expired=0
	node_id=
	if "$vbin" --config "$config" certificate status --json </dev/null >"$tmp/cert.json" 2>"$tmp/cert.err"; then
		registered=1
		node_id=$(sed -n 's/.*"nodeId" *: *"\([^"]*\)".*/\1/p' "$tmp/cert.json")
	else
		rc=$?
		case $rc in
		3) ;; # not registered
		8)
			expired=1
			say "the node certificate has expired: registering again"
			;;
		*)
			cat "$tmp/cert.err" >&2
			die "$EX_FAIL" "\`runos certificate status\` failed with exit $rc (message above)"
			;;
		esac
	fi
	reregistered=0
	if [ "$registered" = 1 ] && [ "$force_register" != 1 ]; then
		if [ -n "$token_file" ]; then
			say "already registered as node $node_id: the token was not used (it stays valid until it expires); pass --force-register to enrol again"
		fi
	else
		[ -n "$token_file" ] ||
			die "$EX_USAGE" "this node is not registered: pass --server HOST and --token-file FILE"
		set -- --server "$host" --token-file "$token_file" --json
		[ -z "$l1_port" ] || set -- "$@" --l1-port "$l1_port"
		[ -z "$l2_port" ] || set -- "$@" --l2-port "$l2_port"
		[ -z "$ca_file" ] || set -- "$@" --ca-file "$ca_file"
		[ -z "$ca_sha256" ] || set -- "$@" --ca-sha256 "$ca_sha256"
		# Replacing an identity: register keeps the old one until the new one has connected.
		if [ "$registered" = 1 ] || [ "$expired" = 1 ]; then
			set -- "$@" --force
		fi
		say "registering with $server"
		if "$vbin" --config "$config" register "$@" </dev/null >"$tmp/register.json"; then
			node_id=$(sed -n 's/.*"nodeId" *: *"\([^"]*\)".*/\1/p' "$tmp/register.json")
			reregistered=1
		else
			rc=$?
			case $rc in
			2) hint="give the CA pin (--ca-sha256), or use a token from \`runos-controlplane token create\`" ;;
			3) hint="fix $config" ;;
			4) hint="check the host, the port (--server HOST:PORT) and firewalls" ;;
			5) hint="create a new token with \`runos-controlplane token create\` and run the installer again" ;;
			6) hint="get the control plane's ca.pem (--ca-file) and its caSha256 from its operator" ;;
			*) hint="see the message above" ;;
			esac
			die "$EX_REGISTER" "runos register failed with exit $rc: $hint. The agent is installed; run the installer again to register"
		fi
	fi

	# --- start ----------------------------------------------------------------------------------
	summary="runos $version installed: $link -> $vbin"
	if [ "$reregistered" = 1 ]; then
		summary="$summary; registered as node $node_id"
	else
		summary="$summary; node $node_id (already registered)"
	fi
	changed=0
	if [ "$binary_changed" = 1 ] || [ "$unit_changed" = 1 ] || [ "$reregistered" = 1 ]; then
		changed=1
	fi

	if command -v gh >/dev/null 2>&1; then
		say "to check the build provenance: gh attestation verify $vbin --repo $repo"
	fi

	if [ "$no_start" = 1 ]; then
		printf '%s\n' "$summary"
		printf 'not started (--no-start). Start the agent with:\n    %s\n' "$agent_cmd"
		[ -n "$root" ] || printf 'or as a service: systemctl enable --now runos\n'
		exit "$EX_OK"
	fi
	if [ -d "$root/run/systemd/system" ] && command -v systemctl >/dev/null 2>&1; then
		systemctl daemon-reload </dev/null || die "$EX_START" "systemctl daemon-reload failed"
		systemctl enable runos </dev/null || die "$EX_START" "systemctl enable runos failed"
		if [ "$changed" = 1 ]; then
			systemctl restart runos </dev/null ||
				die "$EX_START" "systemctl restart runos failed: see \`systemctl status runos\` and \`journalctl -u runos\`"
		else
			systemctl start runos </dev/null ||
				die "$EX_START" "systemctl start runos failed: see \`systemctl status runos\` and \`journalctl -u runos\`"
		fi
		printf '%s\n' "$summary"
		printf 'the runos service is enabled and running: systemctl status runos; runos status\n'
	else
		printf '%s\n' "$summary"
		printf 'systemd is not running here; start the agent with:\n    %s\n' "$agent_cmd"
	fi
	exit "$EX_OK"
}

# The systemd unit, on stdout. Every line is commented; docs/install.md explains the choices.
write_unit() {
	cat <<EOF
# runos node agent. Written by the runos installer, which rewrites it on every run: put local
# changes in a drop-in (systemctl edit runos). docs/install.md explains every line.
[Unit]
Description=runos node agent
Documentation=https://github.com/$repo/blob/main/docs/install.md
# Not required (the agent reports ready before its first connection and reconnects with
# backoff), but starting after the network avoids a first failed attempt at boot.
Wants=network-online.target
After=network-online.target
# Never stop restarting it: without its agent the node cannot be managed.
StartLimitIntervalSec=0

[Service]
# The agent sends READY=1 once initialised, STATUS= with the connection state, STOPPING=1.
Type=notify
# Only the agent's own process may notify: commands it runs for instructions may not.
NotifyAccess=main
ExecStart=$agent_cmd
# SIGHUP re-reads the configuration; the agent never exits on it.
ExecReload=/bin/kill -HUP \$MAINPID
# Stop: SIGTERM to the agent alone. It stops taking instructions, lets running ones finish
# within agent.shutdown_grace_secs and then kills their process groups itself; whatever is
# left in the cgroup afterwards gets SIGKILL. (control-group would SIGTERM every command at
# once and defeat the grace; process would leave orphans behind.)
KillMode=mixed
KillSignal=SIGTERM
# The agent runs each command in a cgroup of its own below the unit's (so that a command's whole
# tree can be ended, also children that called setsid): the unit's subtree is the agent's.
Delegate=yes
# Must exceed agent.shutdown_grace_secs (default 10 s) plus sending the last replies; raise it
# in a drop-in when you raise the grace.
TimeoutStopSec=60
# Restart after any exit, crash or kill, after 5 s.
Restart=always
RestartSec=5s
# Exit 3 (not registered, or invalid configuration) needs an operator: register or fix the
# configuration, then systemctl restart runos.
RestartPreventExitStatus=3
# No sandboxing, on purpose: whatever is set here also binds every command the agent runs for
# the control plane (packages, WireGuard, kubeadm, RUN_COMMAND), and those need full root.
# ProtectSystem/ReadOnlyPaths would stop apt and kubeadm writing /usr, /etc and /var;
# ProtectHome hides /root; PrivateTmp hides /tmp from other services; NoNewPrivileges breaks
# setuid helpers and LSM transitions; ProtectKernelModules blocks modprobe wireguard;
# ProtectKernelTunables blocks sysctl; ProtectHostname, ProtectClock, PrivateDevices,
# RestrictAddressFamilies, RestrictNamespaces, CapabilityBoundingSet, SystemCallFilter,
# RestrictSUIDSGID and UMask=077 each break some of them. OOMScoreAdjust would be inherited by
# every command. The agent's protection is who may instruct it: see SECURITY.md.

[Install]
WantedBy=multi-user.target
EOF
}

trap cleanup EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

main "$@"
