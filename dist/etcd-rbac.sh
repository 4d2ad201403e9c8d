#!/bin/sh
# etcd's users and roles for nv's cluster mode (README, "A cluster that trusts no host"):
#   every host reads /nv/v1/ and writes its own key /nv/v1/hosts/NAME (that key alone);
#   the operator, nv-admin, reads and writes everything under /nv/v1/ (records and the tables
#   to come);
#   nobody else reads or writes anything of nv's.
# Users are certificates' CNs (etcd --client-cert-auth): no passwords. Run it as etcd's root
# (ETCDCTL_ENDPOINTS, ETCDCTL_CACERT, and ETCDCTL_CERT/ETCDCTL_KEY of a certificate whose CN is
# root), with the hosts' names; again when hosts join: what exists is kept.
set -eu
export ETCDCTL_API=3
if [ $# -eq 0 ]; then
    echo "usage: $0 HOST_NAME... (the host_name of every nv host, their certificates' CNs)" >&2
    exit 2
fi
user() {
    etcdctl user get "$1" >/dev/null 2>&1 || etcdctl user add "$1" --no-password >/dev/null
}
role() {
    etcdctl role get "$1" >/dev/null 2>&1 || etcdctl role add "$1" >/dev/null
}
user root
etcdctl user grant-role root root >/dev/null
role nv-reader
etcdctl role grant-permission nv-reader read /nv/v1/ --prefix >/dev/null
role nv-operator
etcdctl role grant-permission nv-operator readwrite /nv/v1/ --prefix >/dev/null
user nv-admin
etcdctl user grant-role nv-admin nv-operator >/dev/null
for host in "$@"; do
    case "$host" in
        root | nv-admin | "" | *[!A-Za-z0-9._-]*)
            echo "$0: '$host' is not a host name nv takes" >&2
            exit 2
            ;;
    esac
    user "$host"
    role "nv-host-$host"
    # The exact key, not a prefix: host1 must not write host10's.
    etcdctl role grant-permission "nv-host-$host" readwrite "/nv/v1/hosts/$host" >/dev/null
    etcdctl user grant-role "$host" nv-reader >/dev/null
    etcdctl user grant-role "$host" "nv-host-$host" >/dev/null
done
etcdctl auth enable >/dev/null
echo "etcd: roles for nv-admin and $# hosts; authentication enabled"
