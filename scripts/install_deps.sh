#!/usr/bin/env bash
# Installs everything cmk_lakebase needs to build and test on Debian 12, as root.
# Idempotent: packages already present are left alone (apt-get install is a no-op).
#
# Notes on package names (Debian 12):
#  - pgbench, pg_waldump, pg_checksums, pg_amcheck and the amcheck extension ship in
#    postgresql-15 itself; there is no postgresql-contrib-15 package.
#  - pg_regress and the PostgreSQL::Test::* TAP modules ship in postgresql-client-15
#    (a dependency of postgresql-15).
#  - postgresql-server-dev-15 may upgrade postgresql-15 to the same minor version.
#  - python3-azure (the Azure SDK: azure-identity, azure-keyvault-keys) and
#    python3-cryptography serve the Azure provider's tests: test/kms/azure_kv_server.py
#    and the SDK run against it; they are used with /usr/bin/python3.
set -euo pipefail

# --list prints the package names, one per line (.ci/run installs them itself).
list_only=0
[ "${1:-}" = --list ] && list_only=1

if [ "$list_only" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
	echo "install_deps.sh: must run as root" >&2
	exit 1
fi

packages=(
	build-essential g++ make
	postgresql-15 postgresql-client-15 postgresql-server-dev-15
	libkrb5-dev  # gssapi/gssapi.h, included by the server's libpq/libpq-be.h (Port)
	libssl-dev libcurl4-openssl-dev rapidjson-dev
	libgtest-dev googletest
	libipc-run-perl perl procps
	python3-pykmip python3-botocore python3-azure
	# Vault Transit and Cloud KMS loopback test servers and their fidelity checks
	# (google-cloud-cli is not in Debian's archive: 063_gcp skips its gcloud checks
	# where it is missing; hvac and PyJWT are Debian packages)
	python3-cryptography python3-jwt python3-hvac curl
	openssl  # test/kms/kmip_certs.sh makes the KMIP tests' throwaway CA and certificates
	pgbackrest  # 086_pgbackrest: backups, archive-push and restores of an encrypted cluster
	# scripts/pg_rootfs.sh: Debian root filesystems carrying PostgreSQL 17, 18 and 19
	# (the version matrix of test/run_all.sh); binutils' nm serves TAP 090
	debootstrap binutils
	xz-utils bzip2  # scripts/pg_upstream_regress.sh (Sources index, source tarball)
	# 095_patroni: Patroni with the etcd3 DCS against one loopback etcd (Patroni's etcd3
	# client is its own, over urllib3, but imports python3-etcd; python3-etcd is only one
	# of the alternatives patroni depends on, so it is named here)
	patroni etcd-server python3-etcd
	gdb  # 052_core_dumps: gcore of a backend and of a tool under the layer
	# 053_local_store_hang: a local key store on a FUSE file system that can hang
	# (test/kms/hang_fs.py; python3-fuse is libfuse2's binding, fuse3 brings fusermount3)
	python3-fuse fuse3
	clang-14 libfuzzer-14-dev  # make fuzz / test/run_fuzz.sh: libFuzzer targets (fuzz/)
)

if [ "$list_only" -eq 1 ]; then
	printf '%s\n' "${packages[@]}"
	exit 0
fi

missing=()
for p in "${packages[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
		missing+=("$p")
	fi
done

if [ "${#missing[@]}" -eq 0 ]; then
	echo "install_deps.sh: all ${#packages[@]} packages already installed"
	exit 0
fi

echo "install_deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
echo "install_deps.sh: done"
