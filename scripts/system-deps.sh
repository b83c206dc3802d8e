#!/usr/bin/env bash
# Debian packages that ivp's tests need beyond Python: swtpm (the software TPM the TPM
# device is tested against) and the TPM2 TSS libraries that tpm2-pytss builds on;
# iproute2, nftables and bubblewrap for `ivp gateway --isolate` (namespaces, the veth's
# firewall, the server's sandbox); softhsm2 for inspector keys in a PKCS#11 token.
# Idempotent and quick when everything is installed (one dpkg-query). Installs as root
# (CI starts from nothing); otherwise it says what is missing and leaves the rest to you.
set -euo pipefail
PKGS=(swtpm swtpm-tools libtss2-dev libtss2-tcti-swtpm0 pkg-config iproute2 nftables
	bubblewrap softhsm2)

if ! command -v dpkg-query >/dev/null; then
	echo "system-deps: not a Debian system: install ${PKGS[*]} (or their equivalents)" >&2
	exit 0
fi
missing=()
for p in "${PKGS[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
		|| missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
	echo "system-deps: missing Debian packages: ${missing[*]} (install them as root;" \
		"the TPM tests need them)" >&2
	exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt=(apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3)
echo "system-deps: installing ${missing[*]}" >&2
"${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
	"${apt[@]}" update -qq
	"${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}"
}
