# Sourced by benches/profile.sh and benches/callgrind.sh: the proxy config both run
# (one worker, no access log, one mock backend, billing to the webhook receiver
# with a spool; METER=off turns billing off; HOOK_EXTRA="batch: 128" adds a
# usage_hook key).
#   proxy_config FILE PROXY_PORT MOCK_PORT HOOK_PORT SPOOL_DIR
proxy_config() {
    cat >"$1" <<EOY
listen: "127.0.0.1:$2"
workers: 1
access_log: "off"
backends:
  - url: "http://127.0.0.1:$3"
usage_hook:
  enabled: $([ "${METER:-on}" = off ] && echo false || echo true)
  url: "http://127.0.0.1:$4/usage"
  spool_dir: "$5"
${HOOK_EXTRA:+  $HOOK_EXTRA}
EOY
}
