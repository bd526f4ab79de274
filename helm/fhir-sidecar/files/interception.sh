set -eu
# fhir-sidecar egress interception (sidecar mode), run once per pod by the `interception` init
# container: the only container with NET_ADMIN. It acts on the pod's network namespace only.
#
#   - TCP from any UID but the sidecar's to the EHR (EHR_DESTINATIONS) is redirected to the
#     sidecar's transparent listener on 127.0.0.1:PROXY_PORT;
#   - every other egress of every UID but the sidecar's is refused, except loopback, DNS to the
#     pod's nameservers, and the reviewed exceptions for the app's UID (APP_EGRESS);
#   - loopback ports only the sidecar may use (PROTECTED_PORTS: admin API, OPA) are refused to
#     every other UID;
#   - only the sidecar's UID reaches the EHR (and anything else the NetworkPolicy allows);
#   - IPv6: nothing is redirected; every egress but the sidecar's is refused.
#
# Parameters (the container's environment, rendered from the chart's values):
#   SIDECAR_UID, APP_UID, PROXY_PORT, EHR_DESTINATIONS ("CIDR:PORT ..."), PROTECTED_PORTS,
#   DNS_SERVERS ("" = the nameservers in /etc/resolv.conf, "none" = no DNS),
#   APP_EGRESS ("CIDR:PORT/PROTO ..."), IPTABLES, IP6TABLES (the -nft or -legacy commands).
# Any failure stops the script, the init container fails and the pod never starts: fail closed.

CHAIN_NAT=FHIR_SIDECAR_REDIRECT
CHAIN_OUT=FHIR_SIDECAR_EGRESS

if [ -z "$DNS_SERVERS" ]; then
  DNS_SERVERS=$(awk '$1 == "nameserver" { print $2 }' /etc/resolv.conf)
elif [ "$DNS_SERVERS" = none ]; then
  DNS_SERVERS=""
fi

# new_chain CMD TABLE CHAIN: create CHAIN empty (a re-run of this container starts over).
new_chain() {
  "$1" -t "$2" -N "$3" 2>/dev/null || "$1" -t "$2" -F "$3"
}
# hook CMD TABLE CHAIN: jump to CHAIN first thing in OUTPUT (once).
hook() {
  "$1" -t "$2" -C OUTPUT -j "$3" 2>/dev/null || "$1" -t "$2" -I OUTPUT 1 -j "$3"
}

# --- IPv4 -----------------------------------------------------------------------------------
new_chain "$IPTABLES" nat "$CHAIN_NAT"
nat() { "$IPTABLES" -t nat -A "$CHAIN_NAT" "$@"; }
nat -m owner --uid-owner "$SIDECAR_UID" -j RETURN
for d in $EHR_DESTINATIONS; do
  nat -p tcp -d "${d%:*}" --dport "${d##*:}" -j REDIRECT --to-ports "$PROXY_PORT"
done

new_chain "$IPTABLES" filter "$CHAIN_OUT"
out() { "$IPTABLES" -t filter -A "$CHAIN_OUT" "$@"; }
out -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
out -m owner --uid-owner "$SIDECAR_UID" -j ACCEPT
for p in $PROTECTED_PORTS; do
  out -o lo -p tcp --dport "$p" -j REJECT --reject-with tcp-reset
done
# EHR connections REDIRECTed above: filter sees them with the new destination but the original
# output interface, so they are matched by destination, not by `-o lo`.
out -d 127.0.0.1/32 -p tcp --dport "$PROXY_PORT" -j ACCEPT
out -o lo -j ACCEPT
for ns in $DNS_SERVERS; do
  case "$ns" in *:*) continue ;; esac
  out -d "$ns" -p udp --dport 53 -j ACCEPT
  out -d "$ns" -p tcp --dport 53 -j ACCEPT
done
for e in $APP_EGRESS; do
  dest=${e%/*}
  out -m owner --uid-owner "$APP_UID" -p "${e##*/}" -d "${dest%:*}" --dport "${dest##*:}" -j ACCEPT
done
out -j REJECT

hook "$IPTABLES" nat "$CHAIN_NAT"
hook "$IPTABLES" filter "$CHAIN_OUT"

# --- IPv6 (when the pod has it) -------------------------------------------------------------
if [ -e /proc/net/if_inet6 ]; then
  new_chain "$IP6TABLES" filter "$CHAIN_OUT"
  out6() { "$IP6TABLES" -t filter -A "$CHAIN_OUT" "$@"; }
  out6 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
  # neighbour discovery: the kernel's own packets (no owner), which IPv6 needs to reach anything
  for t in router-solicitation neighbour-solicitation neighbour-advertisement; do
    out6 -p ipv6-icmp --icmpv6-type "$t" -j ACCEPT
  done
  out6 -m owner --uid-owner "$SIDECAR_UID" -j ACCEPT
  for p in $PROTECTED_PORTS; do
    out6 -o lo -p tcp --dport "$p" -j REJECT --reject-with tcp-reset
  done
  out6 -o lo -j ACCEPT
  for ns in $DNS_SERVERS; do
    case "$ns" in *:*) ;; *) continue ;; esac
    out6 -d "$ns" -p udp --dport 53 -j ACCEPT
    out6 -d "$ns" -p tcp --dport 53 -j ACCEPT
  done
  out6 -j REJECT
  hook "$IP6TABLES" filter "$CHAIN_OUT"
fi

echo "fhir-sidecar interception installed:"
"$IPTABLES" -t nat -S "$CHAIN_NAT"
"$IPTABLES" -t filter -S "$CHAIN_OUT"
if [ -e /proc/net/if_inet6 ]; then "$IP6TABLES" -t filter -S "$CHAIN_OUT"; fi
