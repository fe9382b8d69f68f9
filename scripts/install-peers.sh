#!/usr/bin/env bash
# Installs the Debian packages that Conduit's tests, benchmarks and `conduit demo` use as real
# peers and tools (see shared/real-peers.md):
#   dovecot-imapd dovecot-pop3d  a real IMAP/POP3 server (conduit.peers.Dovecot runs private
#                                instances of it)
#   postfix                      for its test tools smtp-sink and smtp-source only
#   isync                        mbsync, a reference IMAP client for benchmarks
#   kcat                         a Kafka command-line client
#   kubectl                      renders the Kustomize manifests offline
#
# Idempotent: packages already installed are skipped, and `apt-get update` runs only when
# something is missing, so a warm machine pays nothing. Needs root (or sudo) on Debian 12.
# No mail daemon is left running or enabled: the project starts its own private instances.
set -euo pipefail

PACKAGES=(dovecot-imapd dovecot-pop3d postfix isync kcat kubectl)

is_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]] \
        || { [[ $1 == kubectl ]] && command -v kubectl >/dev/null; }   # any kubectl will do
}

has_candidate() {
    local candidate
    candidate="$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')"
    [[ -n $candidate && $candidate != "(none)" ]]
}

missing=()
for package in "${PACKAGES[@]}"; do
    is_installed "$package" || missing+=("$package")
done
if ((${#missing[@]} == 0)); then
    echo "install-peers: all present (${PACKAGES[*]})"
    exit 0
fi
# kubectl is not in Debian 12's own archive (Debian's `kubernetes-client` is v1.20, too old);
# this project's machine image ships it, from another apt source. When it is the only one
# missing and the package lists, already fetched, do not offer it, another `apt-get update`
# would not help: warn and stay fast.
if [[ ${missing[*]} == kubectl ]] && compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null \
    && ! has_candidate kubectl; then
    echo "install-peers: WARNING: no apt source offers kubectl; manifests cannot be rendered" >&2
    exit 0
fi

SUDO=()
if ((EUID != 0)); then
    command -v sudo >/dev/null || { echo "install-peers: run as root" >&2; exit 1; }
    SUDO=(sudo)
fi

echo "install-peers: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Postfix asks what kind of mail system to set up; "No configuration" writes no main.cf, so
# the package's own MTA has nothing to serve (its tools work without it).
echo "postfix postfix/main_mailer_type select No configuration" | "${SUDO[@]}" debconf-set-selections

# Package scripts start their daemons on install. A policy-rc.d that answers 101 ("action
# forbidden") stops that; an existing one (containers ship one) is left as it is.
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\n# installed by Conduit install-peers.sh for the duration of apt-get\nexit 101\n' \
        | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod 755 "$policy"
    trap '"${SUDO[@]}" rm -f "$policy"' EXIT
fi

"${SUDO[@]}" apt-get update -qq

# A package no configured source offers (kubectl on plain Debian 12) is reported, not fatal
# here: the check at the end decides.
installable=()
for package in "${missing[@]}"; do
    if has_candidate "$package"; then
        installable+=("$package")
    else
        echo "install-peers: WARNING: no apt source offers '$package'; skipped" >&2
    fi
done
if ((${#installable[@]} > 0)); then
    "${SUDO[@]}" apt-get install -y -qq "${installable[@]}"
fi

# Belt and braces for machines where the policy file did not apply (or a daemon was started
# anyway): stop and disable the system services of what was installed just now.
services=()
[[ " ${installable[*]-} " == *" postfix "* ]] && services+=(postfix)
[[ " ${installable[*]-} " == *" dovecot-"* ]] && services+=(dovecot)
for service in "${services[@]}"; do
    if [[ -d /run/systemd/system ]]; then
        "${SUDO[@]}" systemctl disable --now "$service" >/dev/null 2>&1 || true
    elif [[ -x /etc/init.d/$service ]]; then
        "${SUDO[@]}" /etc/init.d/"$service" stop >/dev/null 2>&1 || true
        "${SUDO[@]}" update-rc.d "$service" disable >/dev/null 2>&1 || true
    fi
done

still_missing=()
for package in "${PACKAGES[@]}"; do
    is_installed "$package" || still_missing+=("$package")
done
if ((${#still_missing[@]} > 0)); then
    echo "install-peers: not installed: ${still_missing[*]}" >&2
    # Every peer but kubectl is required; kubectl only renders manifests.
    for package in "${still_missing[@]}"; do
        [[ $package == kubectl ]] || exit 1
    done
fi
echo "install-peers: done"
